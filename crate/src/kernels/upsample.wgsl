// Nearest-neighbour 2x upsampling, NCHW: out[n, c, y, x] = x[n, c, y / 2, x / 2].

struct Params {
    n: u32,   // elements of the output
    h: u32,   // input height
    w: u32,   // input width
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;          // (batch, c, h, w)
@group(0) @binding(2) var<storage, read_write> out: array<act>;  // (batch, c, 2h, 2w)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let w2 = p.w * 2u;
    let ox = i % w2;
    let r = i / w2;
    let oy = r % (p.h * 2u);
    let plane = r / (p.h * 2u);
    out[i] = x[(plane * p.h + oy / 2u) * p.w + ox / 2u];
}
