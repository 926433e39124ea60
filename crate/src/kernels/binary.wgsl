// Elementwise binary ops with numpy broadcasting over up to 4 dimensions.
// Specialized by OP: 0 add, 1 mul, 2 sub.

struct Params {
    n: u32,           // elements of the output
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    shape: vec4<u32>, // output shape, left-padded with 1s to rank 4
    sa: vec4<u32>,    // strides of a in elements, 0 where a broadcasts
    sb: vec4<u32>,    // strides of b in elements, 0 where b broadcasts
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<act>;          // broadcastable to shape
@group(0) @binding(2) var<storage, read> b: array<act>;          // broadcastable to shape
@group(0) @binding(3) var<storage, read_write> out: array<act>;  // shape

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    var r = i;
    let i3 = r % p.shape.w;
    r = r / p.shape.w;
    let i2 = r % p.shape.z;
    r = r / p.shape.z;
    let i1 = r % p.shape.y;
    let i0 = r / p.shape.y;
    let idx = vec4<u32>(i0, i1, i2, i3);
    let x = a[dot(idx, p.sa)];
    let y = b[dot(idx, p.sb)];
    var z: act;
    if (OP == 0u) {
        z = x + y;
    } else if (OP == 1u) {
        z = x * y;
    } else {
        z = x - y;
    }
    out[i] = z;
}
