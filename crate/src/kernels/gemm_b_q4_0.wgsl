// GEMM B operand: q4_0 weights (n, k), blocks of 32 along k. A block's 16 quant bytes hold element j in the
// low nibble of byte j and element j + 16 in the high nibble (GGML's order); f16 scales packed two per u32
// from word p.qoff: x = d * (q - 8).
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
    let j = i & 31u;
    let byte = blk * 16u + (j & 15u);
    let shift = 8u * (byte & 3u) + select(0u, 4u, j >= 16u);
    let q = (b[byte >> 2u] >> shift) & 15u;
    let d = block_scale(blk);
    return d * (f32(q) - 8.0);
}

const B_VEC4: bool = true;

// One quant word and one scale for four weights where they fill a word: elements j..j+3 of a block are the
// low (j < 16) or high nibbles of its bytes j % 16 .. j % 16 + 3.
fn load_b4(bi: u32, k: u32, n: u32) -> vec4<f32> {
    let i = n * p.k + k;
    if (!b_whole_word(i, k, n)) {
        return b_col4(bi, k, n);
    }
    let blk = i >> 5u;
    let j = i & 31u;
    let w = b[(blk * 16u + (j & 15u)) >> 2u] >> select(0u, 4u, j >= 16u);
    let q = (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);
    let d = block_scale(blk);
    return d * (vec4<f32>(q) - 8.0);
}
