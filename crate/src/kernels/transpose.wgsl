// Swaps the last two dimensions: (batch, rows, cols) -> (batch, cols, rows), through 16x16 tiles in
// workgroup memory so reads and writes are both contiguous. Converts NCHW to tokens x channels and back.

struct Params {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;          // (batch, rows, cols)
@group(0) @binding(2) var<storage, read_write> out: array<act>;  // (batch, cols, rows)

const T: u32 = 16u;
var<workgroup> tile: array<act, 272>;  // (T, T + 1): the padding column avoids bank conflicts

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let base = wid.z * p.rows * p.cols;
    let r = wid.y * T + l.y;
    let c = wid.x * T + l.x;
    if (r < p.rows && c < p.cols) {
        tile[l.y * (T + 1u) + l.x] = x[base + r * p.cols + c];
    }
    workgroupBarrier();
    let orow = wid.x * T + l.y;  // a column of x
    let ocol = wid.y * T + l.x;  // a row of x
    if (orow < p.cols && ocol < p.rows) {
        out[base + orow * p.rows + ocol] = tile[l.x * (T + 1u) + l.y];
    }
}
