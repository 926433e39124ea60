// Converts between f32 and f16 storage (the aliases src and dst are set by the launcher; needs shader-f16).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<src>;          // (n)
@group(0) @binding(2) var<storage, read_write> out: array<dst>;  // (n)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i < p.n) {
        out[i] = dst(x[i]);
    }
}
