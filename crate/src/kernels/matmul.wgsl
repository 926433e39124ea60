// Batched matmul on the GEMM core: C = A B (+ bias, activation, fusions).
@group(0) @binding(1) var<storage, read> a: array<act>;          // (batch|1, m, k), or (batch|1, k, m) if A_TRANS
@group(0) @binding(7) var<storage, read_write> c: array<c_t>;    // (batch, m, nc), or (batch, nc, m) if C_TRANS

// Columns of C: n, or n / 2 with GEGLU.
fn c_cols() -> u32 {
    return select(p.n, p.n / 2u, GEGLU);
}

fn load_a(bi: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    if (A_TRANS) {
        return f32(a[bi * p.sa + k * p.m + m]);
    }
    return f32(a[bi * p.sa + m * p.k + k]);
}

// Rows m..m+3 at column k.
fn load_a4(bi: u32, m: u32, k: u32) -> vec4<f32> {
    if (k >= p.k || m + 4u > p.m) {
        return vec4<f32>(load_a(bi, m, k), load_a(bi, m + 1u, k), load_a(bi, m + 2u, k), load_a(bi, m + 3u, k));
    }
    if (A_TRANS) {
        let i = bi * p.sa + k * p.m + m;
        return vec4<f32>(f32(a[i]), f32(a[i + 1u]), f32(a[i + 2u]), f32(a[i + 3u]));
    }
    let i = bi * p.sa + m * p.k + k;
    return vec4<f32>(f32(a[i]), f32(a[i + p.k]), f32(a[i + 2u * p.k]), f32(a[i + 3u * p.k]));
}

fn c_index(bi: u32, m: u32, n: u32) -> u32 {
    if (C_TRANS) {
        return bi * p.sc + n * p.m + m;
    }
    return bi * p.sc + m * c_cols() + n;
}
