// Split-K's second pass (ops/gemm.rs, SPLIT_K in gemm_common.wgsl): a GEMM whose k was cut into chunks, each
// summed by its own workgroups into part (f32, one copy of C per chunk, in C's layout), gets here
//   C[i] = act(sum over chunks of part[chunk * total + i] + bias) (+ residual)
// the epilogue the GEMM core applies when it runs k whole (store_one), in the same order.

struct Params {
    total: u32,    // elements of C: batch * sc
    splits: u32,   // chunks
    sc: u32,       // C's batch stride
    m: u32,        // C_TRANS: C is (batch, n, m), so n = (i % sc) / m
    cols: u32,     // else C is (batch, m, cols), so n = (i % sc) % cols
    has_bias: u32,
    act: u32,      // activation code, see apply_act
    bias_off: u32,
    bias_sb: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;       // (splits, total)
@group(0) @binding(2) var<storage, read> bias: array<act>;       // bias rows; a dummy when has_bias is 0
@group(0) @binding(3) var<storage, read> aux: array<act>;        // AUX_RES: the residual, C's layout; else a dummy
@group(0) @binding(4) var<storage, read_write> c: array<act>;    // (total)

@compute @workgroup_size(256)
fn gemm_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.total) {
        return;
    }
    var v = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        v += part[s * p.total + i];
    }
    let bi = i / p.sc;
    let j = i - bi * p.sc;
    let n = select(j % p.cols, j / p.m, C_TRANS);
    if (p.has_bias != 0u) {
        v += f32(bias[p.bias_off + bi * p.bias_sb + n]);
    }
    var r = apply_act(p.act, v);
    if (AUX_RES) {
        r += f32(aux[i]);
    }
    c[i] = act(r);
}
