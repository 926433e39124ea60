// A linear combination of up to four tensors, each read from an element offset:
//   out[i] = sum_j c[j] * x_j[off[j] + i]   for j < p.terms
// Scheduler updates, classifier-free guidance (two halves of one batch) and latent interpolation use it.

struct Params {
    n: u32,
    terms: u32,
    _pad0: u32,
    _pad1: u32,
    off: vec4<u32>,  // element offset into each input
    c: vec4<f32>,    // coefficients
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x0: array<act>;         // (>= off.x + n)
@group(0) @binding(2) var<storage, read> x1: array<act>;         // (>= off.y + n), unused if terms < 2
@group(0) @binding(3) var<storage, read> x2: array<act>;         // (>= off.z + n), unused if terms < 3
@group(0) @binding(4) var<storage, read> x3: array<act>;         // (>= off.w + n), unused if terms < 4
@group(0) @binding(5) var<storage, read_write> out: array<act>;  // (n)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    var acc = p.c.x * f32(x0[p.off.x + i]);
    if (p.terms > 1u) {
        acc += p.c.y * f32(x1[p.off.y + i]);
    }
    if (p.terms > 2u) {
        acc += p.c.z * f32(x2[p.off.z + i]);
    }
    if (p.terms > 3u) {
        acc += p.c.w * f32(x3[p.off.w + i]);
    }
    out[i] = act(acc);
}
