// conv2d (NCHW) as an implicit GEMM on the GEMM core: m = output pixel (oy * wo + ox), n = output channel,
// k = (input channel, ky, kx); A is gathered from the input with padding, B is the weight (cout, cin*KH*KW).
@group(0) @binding(1) var<storage, read> a: array<act>;          // input (batch, cin, h, w)
@group(0) @binding(4) var<storage, read_write> c: array<act>;    // output (batch, cout, ho, wo)

fn load_a(bi: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    let oy = m / p.wo;
    let ox = m - oy * p.wo;
    let ci = k / (KH * KW);
    let r = k - ci * (KH * KW);
    let ky = r / KW;
    let kx = r - ky * KW;
    // Unsigned wrap-around makes coordinates left of / above the image compare as out of range.
    let iy = oy * p.stride + ky - p.pad;
    let ix = ox * p.stride + kx - p.pad;
    if (iy >= p.h || ix >= p.w) {
        return 0.0;
    }
    return f32(a[bi * p.sa + (ci * p.h + iy) * p.w + ix]);
}

fn store_c(bi: u32, m: u32, n: u32, v: f32) {
    c[bi * p.sc + n * p.m + m] = act(v);
}
