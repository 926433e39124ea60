// GEMM B operand: q8_0 weights (n, k), blocks of 32 along k. Quants as packed i8 (4 per u32) from word 0,
// f16 scales packed two per u32 from word p.qoff: x = d * q.
@group(0) @binding(2) var<storage, read> b: array<u32>;

// Block blk's scale.
fn block_scale(blk: u32) -> f32 {
    return unpack2x16float(b[p.qoff + (blk >> 1u)])[blk & 1u];
}

fn load_b(bi: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) {
        return 0.0;
    }
    let i = n * p.k + k;
    let blk = i >> 5u;
    let d = block_scale(blk);
    let q = bitcast<i32>(b[i >> 2u] << (24u - 8u * (i & 3u))) >> 24u;
    return d * f32(q);
}

const B_VEC4: bool = true;

// One quant word and one scale for four weights where they fill a word (always where rows are whole blocks).
fn load_b4(bi: u32, k: u32, n: u32) -> vec4<f32> {
    let i = n * p.k + k;
    if (!b_whole_word(i, k, n)) {
        return b_col4(bi, k, n);
    }
    let blk = i >> 5u;
    let d = block_scale(blk);
    let w = b[i >> 2u];
    let q = bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
    return d * vec4<f32>(q);
}
