// GEMM B operand in the activation dtype: (batch|1, n, k) when B_K_FAST (a linear layer's weight), else
// (batch|1, k, n).
@group(0) @binding(2) var<storage, read> b: array<act>;

fn load_b(bi: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) {
        return 0.0;
    }
    if (B_K_FAST) {
        return f32(b[bi * p.sb + n * p.k + k]);
    }
    return f32(b[bi * p.sb + k * p.n + n]);
}
