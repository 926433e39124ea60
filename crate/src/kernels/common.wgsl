// Shared helpers, prepended to kernels that use them.

// erf as 1 - erfc, with erfc from Numerical Recipes' Chebyshev fit (fractional error below 1.2e-7).
// WGSL has no erf builtin.
fn erf_f32(v: f32) -> f32 {
    let s = sign(v);
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.5 * a);
    let y = t * exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277)))))))));
    return s * (1.0 - y);
}

fn gelu_f32(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf_f32(v * 0.70710678118654752));
}

fn silu_f32(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

fn quick_gelu_f32(v: f32) -> f32 {
    return v / (1.0 + exp(-1.702 * v));
}

// Activation codes shared by fused kernels: 0 none, 1 SiLU, 2 GELU (erf), 3 QuickGELU, 4 ReLU.
fn apply_act(code: u32, v: f32) -> f32 {
    switch code {
        case 1u: { return silu_f32(v); }
        case 2u: { return gelu_f32(v); }
        case 3u: { return quick_gelu_f32(v); }
        case 4u: { return max(v, 0.0); }
        default: { return v; }
    }
}

// Element i of a buffer of f16 values packed two per u32 (readable without shader-f16).
fn unpack_f16(words_i: u32, word: u32) -> f32 {
    return unpack2x16float(word)[words_i & 1u];
}
