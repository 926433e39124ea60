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

// Read element by element (the tiles' B_K_FAST loop, consecutive invocations along k, keeps each load
// instruction on whole row segments; four scalar loads per invocation along k would not be).
const B_VEC4: bool = false;

fn load_b4(bi: u32, k: u32, n: u32) -> vec4<f32> {
    return b_col4(bi, k, n);
}
