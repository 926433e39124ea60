// Concatenation of two tensors along one dimension, seen as (outer, c, inner): out = [a | b] along c.

struct Params {
    n: u32,      // elements of the output
    ca: u32,     // a's size along the dimension
    cb: u32,     // b's size along the dimension
    inner: u32,  // product of the dimensions after it
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<act>;          // (outer, ca, inner)
@group(0) @binding(2) var<storage, read> b: array<act>;          // (outer, cb, inner)
@group(0) @binding(3) var<storage, read_write> out: array<act>;  // (outer, ca + cb, inner)

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    let c = p.ca + p.cb;
    let j = i % p.inner;
    let r = i / p.inner;
    let ci = r % c;
    let o = r / c;
    if (ci < p.ca) {
        out[i] = a[(o * p.ca + ci) * p.inner + j];
    } else {
        out[i] = b[(o * p.cb + ci - p.ca) * p.inner + j];
    }
}
