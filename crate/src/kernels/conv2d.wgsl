// conv2d (NCHW) as an implicit GEMM on the GEMM core: m = output pixel (oy * wo + ox), n = output channel,
// k = (input channel, ky, kx); A is gathered from the input with padding, B is the weight (cout, cin*KH*KW).
// UP2: the input is read as if upsampled 2x (nearest), so that upsample-then-conv is one pass; p.h and p.w
// are the upsampled size. AUX_CAT: input channels from p.split on come from aux, so that a conv over a
// channel concatenation reads its two parts in place. GN_A (and GN_SILU): the input is group-normalized (then
// SiLU) as it is loaded, from statistics a stats pass made (ops/norm.rs), so the normalized tensor is never
// written; padding stays zero, as it pads the normalized image.
@group(0) @binding(1) var<storage, read> a: array<act>;          // input (batch, cin | split, h, w) (h/2, w/2 with UP2)
@group(0) @binding(7) var<storage, read_write> c: array<act>;    // output (batch, cout, ho, wo)

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
    var iy = oy * p.stride + ky - p.pad;
    var ix = ox * p.stride + kx - p.pad;
    if (iy >= p.h || ix >= p.w) {
        return 0.0;
    }
    var h = p.h;
    var w = p.w;
    if (UP2) {
        iy = iy / 2u;
        ix = ix / 2u;
        h = h / 2u;
        w = w / 2u;
    }
    var v: f32;
    if (AUX_CAT && ci >= p.split) {
        v = f32(aux[(bi * (p.cin - p.split) + ci - p.split) * h * w + iy * w + ix]);
    } else {
        v = f32(a[bi * p.sa + (ci * h + iy) * w + ix]);
    }
    if (GN_A) {
        let st = 2u * (bi * p.groups + ci / (p.cin / p.groups));
        v = (v - gn_stats[st]) * gn_stats[st + 1u] * f32(gn_affine[ci]) + f32(gn_affine[p.cin + ci]);
        if (GN_SILU) {
            v = silu_f32(v);
        }
    }
    return v;
}

fn c_index(bi: u32, m: u32, n: u32) -> u32 {
    return bi * p.sc + n * p.m + m;
}
