// conv2d (NCHW) as an implicit GEMM on the GEMM core: m = output pixel (oy * wo + ox), n = output channel,
// k = (input channel, ky, kx); A is gathered from the input with padding, B is the weight (cout, cin*KH*KW).
// UP2: the input is read as if upsampled 2x (nearest), so that upsample-then-conv is one pass; p.h and p.w
// are the upsampled size. AUX_CAT: input channels from p.split on come from aux, so that a conv over a
// channel concatenation reads its two parts in place. GN_A (and GN_SILU): the input is group-normalized (then
// SiLU) as it is loaded, from statistics a stats pass made (ops/norm.rs), so the normalized tensor is never
// written; padding stays zero, as it pads the normalized image.
@group(0) @binding(1) var<storage, read> a: array<act>;          // input (batch, cin | split, h, w) (h/2, w/2 with UP2)
@group(0) @binding(7) var<storage, read_write> c: array<c_t>;    // output (batch, cout, ho, wo)

// What the rows of GEMM column k share: the input channel's plane (in a or, past p.split with AUX_CAT, in aux),
// the kernel tap and the channel's group norm.
struct Tap {
    base: u32,
    from_aux: bool,
    ky: u32,
    kx: u32,
    mean: f32,
    scale: f32,  // GN_A: 1/std * gamma
    beta: f32,
}

fn tap(bi: u32, k: u32) -> Tap {
    let ci = k / (KH * KW);
    let r = k - ci * (KH * KW);
    var t: Tap;
    t.ky = r / KW;
    t.kx = r - t.ky * KW;
    let hw = select(p.h * p.w, (p.h / 2u) * (p.w / 2u), UP2);
    t.from_aux = AUX_CAT && ci >= p.split;
    if (t.from_aux) {
        t.base = (bi * (p.cin - p.split) + ci - p.split) * hw;
    } else {
        t.base = bi * p.sa + ci * hw;
    }
    if (GN_A) {
        let st = 2u * (bi * p.groups + ci / (p.cin / p.groups));
        t.mean = gn_stats[st];
        t.scale = gn_stats[st + 1u] * f32(gn_affine[ci]);
        t.beta = f32(gn_affine[p.cin + ci]);
    }
    return t;
}

// The input under output pixel (oy, ox) through tap t (group-normalized with GN_A); 0 in the padding.
fn tap_at(t: Tap, oy: u32, ox: u32) -> f32 {
    // Unsigned wrap-around makes coordinates left of / above the image compare as out of range.
    var iy = oy * p.stride + t.ky - p.pad;
    var ix = ox * p.stride + t.kx - p.pad;
    if (iy >= p.h || ix >= p.w) {
        return 0.0;
    }
    var w = p.w;
    if (UP2) {
        iy = iy / 2u;
        ix = ix / 2u;
        w = w / 2u;
    }
    var v: f32;
    if (t.from_aux) {
        v = f32(aux[t.base + iy * w + ix]);
    } else {
        v = f32(a[t.base + iy * w + ix]);
    }
    if (GN_A) {
        v = (v - t.mean) * t.scale + t.beta;
        if (GN_SILU) {
            v = silu_f32(v);
        }
    }
    return v;
}

fn load_a(bi: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    let oy = m / p.wo;
    return tap_at(tap(bi, k), oy, m - oy * p.wo);
}

// Output pixel (oy, ox) -> the next one along the row, wrapping to the next row.
fn next_px(yx: vec2<u32>) -> vec2<u32> {
    if (yx.y + 1u == p.wo) {
        return vec2<u32>(yx.x + 1u, 0u);
    }
    return vec2<u32>(yx.x, yx.y + 1u);
}

fn tap_m(t: Tap, m: u32, yx: vec2<u32>) -> f32 {
    if (m >= p.m) {
        return 0.0;
    }
    return tap_at(t, yx.x, yx.y);
}

// Rows m..m+3 at column k: the tap (its divisions and group norm loads) once for the four pixels.
fn load_a4(bi: u32, m: u32, k: u32) -> vec4<f32> {
    if (m >= p.m || k >= p.k) {
        return vec4<f32>(0.0);
    }
    let t = tap(bi, k);
    let oy = m / p.wo;
    let p0 = vec2<u32>(oy, m - oy * p.wo);
    let p1 = next_px(p0);
    let p2 = next_px(p1);
    let p3 = next_px(p2);
    return vec4<f32>(tap_at(t, p0.x, p0.y), tap_m(t, m + 1u, p1), tap_m(t, m + 2u, p2), tap_m(t, m + 3u, p3));
}

fn c_index(bi: u32, m: u32, n: u32) -> u32 {
    return bi * p.sc + n * p.m + m;
}
