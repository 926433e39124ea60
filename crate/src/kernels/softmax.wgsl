// Softmax over the last dimension of x * scale: one workgroup per row (max, sum of exponentials, write), in
// f32. The scale lets attention's 1/sqrt(d) ride along instead of costing a pass of its own.

struct Params {
    rows: u32,
    len: u32,
    scale: f32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;          // (rows, len)
@group(0) @binding(2) var<storage, read_write> out: array<act>;  // (rows, len)

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            if (is_max) {
                partial[lid] = max(partial[lid], partial[lid + stride]);
            } else {
                partial[lid] += partial[lid + stride];
            }
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;  // uniform across the workgroup
    }
    let base = row * p.len;
    var m = -3.0e38;
    for (var i = lid; i < p.len; i += WG) {
        m = max(m, f32(x[base + i]) * p.scale);
    }
    m = reduce(lid, m, true);
    var s = 0.0;
    for (var i = lid; i < p.len; i += WG) {
        s += exp(f32(x[base + i]) * p.scale - m);
    }
    let inv = 1.0 / reduce(lid, s, false);
    for (var i = lid; i < p.len; i += WG) {
        out[base + i] = act(exp(f32(x[base + i]) * p.scale - m) * inv);
    }
}
