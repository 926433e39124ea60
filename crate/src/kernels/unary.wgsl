// Elementwise activations, computed in f32 whatever the storage type (helpers in common.wgsl).
// Specialized by OP: 0 SiLU, 1 GELU (erf form), 2 QuickGELU, 3 GEGLU, 4 scale-and-shift (x * p.alpha + p.beta),
// 5 ReLU, 6 soft clamp tanh(x / p.alpha) * p.alpha (TAESD's latent input).
// GEGLU reads rows of 2*half: out[r, j] = x[r, j] * gelu(x[r, half + j]) (diffusers' GEGLU chunk order).

struct Params {
    n: u32,     // elements of the output
    half: u32,  // GEGLU: output row length (input rows are twice as long)
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;          // (n) or for GEGLU (n / half, 2 * half)
@group(0) @binding(2) var<storage, read_write> out: array<act>;  // (n)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    var y: f32;
    if (OP == 3u) {
        let row = i / p.half;
        let j = i - row * p.half;
        let h = f32(x[row * 2u * p.half + j]);
        let g = f32(x[row * 2u * p.half + p.half + j]);
        y = h * gelu_f32(g);
    } else {
        let v = f32(x[i]);
        if (OP == 0u) {
            y = silu_f32(v);
        } else if (OP == 1u) {
            y = gelu_f32(v);
        } else if (OP == 2u) {
            y = quick_gelu_f32(v);
        } else if (OP == 4u) {
            y = v * p.alpha + p.beta;
        } else if (OP == 5u) {
            y = max(v, 0.0);
        } else {
            y = tanh(v / p.alpha) * p.alpha;
        }
    }
    out[i] = act(y);
}
