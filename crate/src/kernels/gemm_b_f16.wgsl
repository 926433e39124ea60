// GEMM B operand: f16 weights packed two per u32, read with unpack2x16float (no shader-f16 needed).
// Layout (n, k) when B_K_FAST, else (k, n); shared by the batch.
@group(0) @binding(2) var<storage, read> b: array<u32>;

fn load_b(bi: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) {
        return 0.0;
    }
    var i: u32;
    if (B_K_FAST) {
        i = n * p.k + k;
    } else {
        i = k * p.n + n;
    }
    return unpack2x16float(b[i >> 1u])[i & 1u];
}

const B_VEC4: bool = true;

// Two words for four weights where they start a word.
fn load_b4(bi: u32, k: u32, n: u32) -> vec4<f32> {
    let i = n * p.k + k;
    if (n >= p.n || k + 4u > p.k || (i & 1u) != 0u) {
        return b_col4(bi, k, n);
    }
    return vec4<f32>(unpack2x16float(b[i >> 1u]), unpack2x16float(b[(i >> 1u) + 1u]));
}
