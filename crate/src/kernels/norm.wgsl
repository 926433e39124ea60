// Group norm and layer norm: each workgroup normalizes one row of `len` contiguous elements.
//   layer norm over x (rows, c):   groups = 1, s = 1: the affine index is the position in the row.
//   group norm over x (n, c, s):   row = n * groups + g spans the group's c / groups channels of s elements;
//                                  the affine index is the channel.
// Optionally fused with SiLU. Statistics in f32, two passes (mean, then variance about the mean).
// Group norm over a channel concatenation: with split > 0, channels from `split` on come from x2, so the
// concatenated tensor is only ever written normalized.
// STATS: only the statistics, (rows, 2) f32 (mean, 1 / std), for a conv that normalizes its input as it
// loads it (kernels/conv2d.wgsl, GN_A): the normalized tensor is never written. `out_t` is f32 then, `act`
// otherwise.

struct Params {
    rows: u32,
    len: u32,       // elements per row
    groups: u32,    // rows per sample (group norm), 1 for layer norm
    s: u32,         // elements per channel (spatial size), 1 for layer norm
    eps: f32,
    silu: u32,
    affine: u32,
    split: u32,     // group norm over concat(x, x2) on channels: x's channels; 0 without x2
    c2: u32,        // x2's channels
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;          // (rows, len)
@group(0) @binding(2) var<storage, read> gamma: array<act>;      // (channels), or a dummy if affine is 0
@group(0) @binding(3) var<storage, read> beta: array<act>;       // (channels), or a dummy if affine is 0
@group(0) @binding(4) var<storage, read> x2: array<act>;         // (n, c2, s) with split > 0, else a dummy
@group(0) @binding(5) var<storage, read_write> out: array<out_t>;  // (rows, len), or (rows, 2) with STATS

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// Element i of row `row` (of len elements at `base`).
fn load_x(row: u32, base: u32, i: u32) -> f32 {
    if (p.split == 0u) {
        return f32(x[base + i]);
    }
    let n = row / p.groups;
    let c = (row % p.groups) * (p.len / p.s) + i / p.s;
    let sp = i % p.s;
    if (c < p.split) {
        return f32(x[(n * p.split + c) * p.s + sp]);
    }
    return f32(x2[(n * p.c2 + c - p.split) * p.s + sp]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;  // uniform across the workgroup
    }
    let base = row * p.len;
    var sum = 0.0;
    for (var i = lid; i < p.len; i += WG) {
        sum += load_x(row, base, i);
    }
    let mean = reduce_sum(lid, sum) / f32(p.len);
    var sq = 0.0;
    for (var i = lid; i < p.len; i += WG) {
        let d = load_x(row, base, i) - mean;
        sq += d * d;
    }
    let rstd = inverseSqrt(reduce_sum(lid, sq) / f32(p.len) + p.eps);
    if (STATS) {
        if (lid == 0u) {
            out[2u * row] = out_t(mean);
            out[2u * row + 1u] = out_t(rstd);
        }
        return;
    }
    let channel0 = (row % p.groups) * (p.len / p.s);
    for (var i = lid; i < p.len; i += WG) {
        var y = (load_x(row, base, i) - mean) * rstd;
        if (p.affine != 0u) {
            let c = channel0 + i / p.s;
            y = y * f32(gamma[c]) + f32(beta[c]);
        }
        if (p.silu != 0u) {
            y = y / (1.0 + exp(-y));
        }
        out[base + i] = out_t(y);
    }
}
