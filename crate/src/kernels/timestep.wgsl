// Sinusoidal timestep embedding as diffusers' get_timestep_embedding:
//   freq_i = exp(-ln(max_period) * i / (half - shift)), arg = t * freq_i,
//   out = [sin(arg), cos(arg)], or [cos(arg), sin(arg)] when flip_sin_to_cos; a zero column pads odd dims.

struct Params {
    n: u32,          // timesteps
    dim: u32,
    shift: f32,      // downscale_freq_shift
    flip: u32,       // flip_sin_to_cos
    log_max_period: f32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> t: array<f32>;          // (n)
@group(0) @binding(2) var<storage, read_write> out: array<act>;  // (n, dim)

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.n * p.dim) {
        return;
    }
    let row = i / p.dim;
    let j = i - row * p.dim;
    let half = p.dim / 2u;
    if (j >= 2u * half) {
        out[i] = act(0.0);
        return;
    }
    let f = j % half;
    let freq = exp(-p.log_max_period * f32(f) / (f32(half) - p.shift));
    let arg = p.scale * t[row] * freq;
    let first = j < half;
    // first half is sin unless flipped
    var y: f32;
    if (first != (p.flip != 0u)) {
        y = sin(arg);
    } else {
        y = cos(arg);
    }
    out[i] = act(y);
}
