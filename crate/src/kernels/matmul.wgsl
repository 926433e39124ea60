// Batched matmul on the GEMM core: C = A B (+ bias, activation).
@group(0) @binding(1) var<storage, read> a: array<act>;          // (batch|1, m, k), or (batch|1, k, m) if A_TRANS
@group(0) @binding(4) var<storage, read_write> c: array<act>;    // (batch, m, n)

fn load_a(bi: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    if (A_TRANS) {
        return f32(a[bi * p.sa + k * p.m + m]);
    }
    return f32(a[bi * p.sa + m * p.k + k]);
}

fn store_c(bi: u32, m: u32, n: u32, v: f32) {
    c[bi * p.sc + m * p.n + n] = act(v);
}
