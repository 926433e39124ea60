// Latent-to-RGB preview: rgb = factors^T latent + bias per pixel, shown as x * 0.5 + 0.5, packed RGBA8.

struct Params {
    hw: u32,          // pixels of the latent
    channels: u32,    // latent channels (at most 4)
    _pad0: u32,
    _pad1: u32,
    f0: vec4<f32>,    // rgb factors of channel 0 (w unused)
    f1: vec4<f32>,
    f2: vec4<f32>,
    f3: vec4<f32>,
    bias: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> latent: array<act>;     // (1, channels, h, w)
@group(0) @binding(2) var<storage, read_write> out: array<u32>;  // (h * w) RGBA8

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.hw) {
        return;
    }
    var rgb = p.bias.xyz;
    let f = array<vec4<f32>, 4>(p.f0, p.f1, p.f2, p.f3);
    for (var c = 0u; c < min(p.channels, 4u); c++) {
        rgb += f32(latent[c * p.hw + i]) * f[c].xyz;
    }
    out[i] = pack4x8unorm(vec4<f32>(clamp(rgb * 0.5 + 0.5, vec3<f32>(0.0), vec3<f32>(1.0)), 1.0));
}
