// The portable tiled GEMM core (see gemm_common.wgsl): workgroup tiles in f32, register micro-tiles.

const NT: u32 = (BM / TM) * (BN / TM);
// NBUF tiles of each operand: 2 with double buffering (see accumulate), else 1.
const A_TILE: u32 = BK * BM / 4u;
const B_TILE: u32 = BK * BN / 4u;
var<workgroup> As: array<vec4<f32>, NBUF * A_TILE>;  // (BK, BM) tiles of A, k-major
var<workgroup> Bs: array<vec4<f32>, NBUF * B_TILE>;  // (BK, BN) tiles of B, k-major

// AUX_LN: the mean and 1/std of the A rows this invocation loads (rows 4q..4q+3 of load iteration 0 and 1;
// with A_K_FAST the rows an invocation loads are the same at every k0).
var<private> ln_mean0: vec4<f32>;
var<private> ln_rstd0: vec4<f32>;
var<private> ln_mean1: vec4<f32>;
var<private> ln_rstd1: vec4<f32>;

// Sums over this invocation's k residue (k = lid % BK, + BK ...) of rows 4q.. (iteration j), centred on `c`
// and squared when `sq`, reduced over the BK invocations sharing the rows through As.
fn ln_pass(bi: u32, m0: u32, lid: u32, sq: bool) {
    for (var i = lid; i < BK * BM / 4u; i += NT) {
        let q = i / BK;
        let j = i / NT;
        var c = select(ln_mean0, ln_mean1, j == 1u);
        var s = vec4<f32>(0.0);
        for (var k = i % BK; k < p.k; k += BK) {
            let v = load_a4(bi, m0 + q * 4u, k);
            if (sq) {
                let d = v - c;
                s += d * d;
            } else {
                s += v;
            }
        }
        As[i] = s;
    }
    workgroupBarrier();
    for (var i = lid; i < BK * BM / 4u; i += NT) {
        let q = i / BK;
        var t = vec4<f32>(0.0);
        for (var kk = 0u; kk < BK; kk++) {
            t += As[q * BK + kk];
        }
        let r = t / f32(p.k);
        if (sq) {
            let rstd = inverseSqrt(r + vec4<f32>(p.eps));
            if (i / NT == 0u) { ln_rstd0 = rstd; } else { ln_rstd1 = rstd; }
        } else {
            if (i / NT == 0u) { ln_mean0 = r; } else { ln_mean1 = r; }
        }
    }
    workgroupBarrier();
}

fn ln_stats(bi: u32, m0: u32, lid: u32) {
    ln_pass(bi, m0, lid, false);
    ln_pass(bi, m0, lid, true);
}

// Register prefetch (PREFETCH, the default; see Tuning in gpu/context.rs): the next k step's tile elements
// an invocation loads (at most two vec4s of A and two of B, const_asserts below) are read from global memory
// before the current step's products, so those loads are in flight while it computes, and written to the
// tiles after the step's closing barrier. Without it they are read at the start of their own step.
const_assert BK * BM / 4u <= 2u * NT && BK * BN / 4u <= 2u * NT;
var<private> ra0: vec4<f32>;
var<private> ra1: vec4<f32>;
var<private> rb0: vec4<f32>;
var<private> rb1: vec4<f32>;

// Load iteration i of the A tile at k0 (layer-normalized with AUX_LN).
fn fetch_a(bi: u32, m0: u32, k0: u32, i: u32) -> vec4<f32> {
    if (i >= BK * BM / 4u) {
        return vec4<f32>(0.0);
    }
    let slot = tile_slot(i, BM, A_K_FAST);
    let k = k0 + slot.x;
    var v = load_a4(bi, m0 + slot.y * 4u, k);
    if (AUX_LN && k < p.k) {
        let first = i < NT;
        v = (v - select(ln_mean1, ln_mean0, first)) * select(ln_rstd1, ln_rstd0, first) * f32(aux[k])
            + f32(aux[p.k + k]);
    }
    return v;
}

fn store_a(buf: u32, i: u32, v: vec4<f32>) {
    if (i < BK * BM / 4u) {
        let slot = tile_slot(i, BM, A_K_FAST);
        As[buf * A_TILE + slot.x * (BM / 4u) + slot.y] = v;
    }
}

// With B stored (n, k) and a source that reads words (B_VEC4: packed weights), iteration i is four
// consecutive k of one column (load_b4: one or two words where load_b reads words per element), written down
// the tile's k rows; four invocations cover a column's BK, so a warp reads whole row segments. Else four
// columns (or four k) element by element.
const B_WORDS: bool = B_K_FAST && B_VEC4;

fn fetch_b(bi: u32, n0: u32, k0: u32, i: u32) -> vec4<f32> {
    if (i >= BK * BN / 4u) {
        return vec4<f32>(0.0);
    }
    if (B_WORDS) {
        return load_b4(bi, k0 + 4u * (i % (BK / 4u)), src_col(n0 + i / (BK / 4u)));
    }
    let slot = tile_slot(i, BN, B_K_FAST);
    let k = k0 + slot.x;
    let n = n0 + slot.y * 4u;
    return vec4<f32>(load_b(bi, k, src_col(n)), load_b(bi, k, src_col(n + 1u)), load_b(bi, k, src_col(n + 2u)),
                     load_b(bi, k, src_col(n + 3u)));
}

fn store_b(buf: u32, i: u32, v: vec4<f32>) {
    if (i >= BK * BN / 4u) {
        return;
    }
    if (B_WORDS) {
        let nl = i / (BK / 4u);
        let at = buf * B_TILE + 4u * (i % (BK / 4u)) * (BN / 4u) + nl / 4u;
        let lane = nl % 4u;
        Bs[at][lane] = v.x;
        Bs[at + BN / 4u][lane] = v.y;
        Bs[at + BN / 2u][lane] = v.z;
        Bs[at + 3u * (BN / 4u)][lane] = v.w;
        return;
    }
    let slot = tile_slot(i, BN, B_K_FAST);
    Bs[buf * B_TILE + slot.x * (BN / 4u) + slot.y] = v;
}

fn fetch_tiles(bi: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    ra0 = fetch_a(bi, m0, k0, lid);
    rb0 = fetch_b(bi, n0, k0, lid);
    if (BK * BM / 4u > NT) {
        ra1 = fetch_a(bi, m0, k0, lid + NT);
    }
    if (BK * BN / 4u > NT) {
        rb1 = fetch_b(bi, n0, k0, lid + NT);
    }
}

fn store_tiles(buf: u32, lid: u32) {
    store_a(buf, lid, ra0);
    store_b(buf, lid, rb0);
    if (BK * BM / 4u > NT) {
        store_a(buf, lid + NT, ra1);
    }
    if (BK * BN / 4u > NT) {
        store_b(buf, lid + NT, rb1);
    }
}

// The k loop of both entry points: the workgroup's (BM, BN) block of A B over k in [z.y, z.z) (z: split_z's
// batch item and k range), each invocation's part of it summed in its micro-tile's accumulators (fma4 or
// fma8, by TM: a constant, so the other call is folded away).
fn accumulate(z: vec3<u32>, m0: u32, n0: u32, lid: u32, ty: u32, tx: u32) {
    let bi = z.x;
    if (AUX_LN) {
        ln_stats(bi, m0, lid);
    }
    if (NBUF == 2u) {
        accumulate_double(z, m0, n0, lid, ty, tx);
        return;
    }
    if (PREFETCH) {
        fetch_tiles(bi, m0, n0, z.y, lid);
    }
    for (var k0 = z.y; k0 < z.z; k0 += BK) {
        if (!PREFETCH) {
            fetch_tiles(bi, m0, n0, k0, lid);
        }
        store_tiles(0u, lid);
        workgroupBarrier();
        if (PREFETCH && k0 + BK < z.z) {
            fetch_tiles(bi, m0, n0, k0 + BK, lid);
        }
        products(0u, ty, tx);
        workgroupBarrier();
    }
}

// Double buffering (NBUF = 2, Tuning::gemm_double_buffer, where the workgroup memory allows): step s reads
// tile s % 2 while the next step's elements, fetched into registers before the products, are written to the
// other; one barrier a step instead of two. The barrier ending step s - 1 is what lets step s overwrite the
// tile that step s - 1 read, and the one ending step s makes step s + 1's tile visible.
fn accumulate_double(z: vec3<u32>, m0: u32, n0: u32, lid: u32, ty: u32, tx: u32) {
    let bi = z.x;
    fetch_tiles(bi, m0, n0, z.y, lid);
    store_tiles(0u, lid);
    workgroupBarrier();
    var cur = 0u;
    for (var k0 = z.y; k0 < z.z; k0 += BK) {
        let more = k0 + BK < z.z;
        if (more) {
            fetch_tiles(bi, m0, n0, k0 + BK, lid);
        }
        products(cur, ty, tx);
        if (more) {
            store_tiles(1u - cur, lid);
        }
        workgroupBarrier();
        cur = 1u - cur;
    }
}

// One k step's products from tile `buf`.
fn products(buf: u32, ty: u32, tx: u32) {
    for (var kk = 0u; kk < BK; kk += 4u) {
        fma_tm(buf, kk, ty, tx);
        fma_tm(buf, kk + 1u, ty, tx);
        fma_tm(buf, kk + 2u, ty, tx);
        fma_tm(buf, kk + 3u, ty, tx);
    }
}

fn fma_tm(buf: u32, kk: u32, ty: u32, tx: u32) {
    if (TM == 4u) {
        fma4(buf, kk, ty, tx);
    } else {
        fma8(buf, kk, ty, tx);
    }
}

// ---- 4x4 micro-tile: invocation (tx, ty) owns rows 4ty..4ty+3 and columns 4tx..4tx+3.

var<private> c0: vec4<f32>;
var<private> c1: vec4<f32>;
var<private> c2: vec4<f32>;
var<private> c3: vec4<f32>;

fn fma4(buf: u32, kk: u32, ty: u32, tx: u32) {
    let a = As[buf * A_TILE + kk * (BM / 4u) + ty];
    let b = Bs[buf * B_TILE + kk * (BN / 4u) + tx];
    c0 += a.x * b;
    c1 += a.y * b;
    c2 += a.z * b;
    c3 += a.w * b;
}

@compute @workgroup_size(NT)
fn gemm_4x4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % (BN / 4u);
    let ty = lid / (BN / 4u);
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let z = split_z(wid.z);
    let bi = z.x;
    accumulate(z, m0, n0, lid, ty, tx);
    let m = m0 + ty * 4u;
    let n = n0 + tx * 4u;
    store_vec(bi, m, n, c0);
    store_vec(bi, m + 1u, n, c1);
    store_vec(bi, m + 2u, n, c2);
    store_vec(bi, m + 3u, n, c3);
}

// ---- 8x8 micro-tile: invocation (tx, ty) owns rows {4ty.., BM/2 + 4ty..} x columns {4tx.., BN/2 + 4tx..}
// (two blocks of four apart, so neighbouring invocations read neighbouring vec4s of the tiles).

var<private> d00: vec4<f32>;
var<private> d01: vec4<f32>;
var<private> d10: vec4<f32>;
var<private> d11: vec4<f32>;
var<private> d20: vec4<f32>;
var<private> d21: vec4<f32>;
var<private> d30: vec4<f32>;
var<private> d31: vec4<f32>;
var<private> d40: vec4<f32>;
var<private> d41: vec4<f32>;
var<private> d50: vec4<f32>;
var<private> d51: vec4<f32>;
var<private> d60: vec4<f32>;
var<private> d61: vec4<f32>;
var<private> d70: vec4<f32>;
var<private> d71: vec4<f32>;

fn fma8(buf: u32, kk: u32, ty: u32, tx: u32) {
    let a0 = As[buf * A_TILE + kk * (BM / 4u) + ty];
    let a1 = As[buf * A_TILE + kk * (BM / 4u) + BM / 8u + ty];
    let b0 = Bs[buf * B_TILE + kk * (BN / 4u) + tx];
    let b1 = Bs[buf * B_TILE + kk * (BN / 4u) + BN / 8u + tx];
    d00 += a0.x * b0;
    d01 += a0.x * b1;
    d10 += a0.y * b0;
    d11 += a0.y * b1;
    d20 += a0.z * b0;
    d21 += a0.z * b1;
    d30 += a0.w * b0;
    d31 += a0.w * b1;
    d40 += a1.x * b0;
    d41 += a1.x * b1;
    d50 += a1.y * b0;
    d51 += a1.y * b1;
    d60 += a1.z * b0;
    d61 += a1.z * b1;
    d70 += a1.w * b0;
    d71 += a1.w * b1;
}

@compute @workgroup_size(NT)
fn gemm_8x8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % (BN / 8u);
    let ty = lid / (BN / 8u);
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let z = split_z(wid.z);
    let bi = z.x;
    accumulate(z, m0, n0, lid, ty, tx);
    let ma = m0 + ty * 4u;
    let mb = m0 + BM / 2u + ty * 4u;
    let na = n0 + tx * 4u;
    let nb = n0 + BN / 2u + tx * 4u;
    if (GEGLU) {
        store_glu(bi, ma, na, d00, d01);
        store_glu(bi, ma + 1u, na, d10, d11);
        store_glu(bi, ma + 2u, na, d20, d21);
        store_glu(bi, ma + 3u, na, d30, d31);
        store_glu(bi, mb, na, d40, d41);
        store_glu(bi, mb + 1u, na, d50, d51);
        store_glu(bi, mb + 2u, na, d60, d61);
        store_glu(bi, mb + 3u, na, d70, d71);
        return;
    }
    store_vec(bi, ma, na, d00);
    store_vec(bi, ma, nb, d01);
    store_vec(bi, ma + 1u, na, d10);
    store_vec(bi, ma + 1u, nb, d11);
    store_vec(bi, ma + 2u, na, d20);
    store_vec(bi, ma + 2u, nb, d21);
    store_vec(bi, ma + 3u, na, d30);
    store_vec(bi, ma + 3u, nb, d31);
    store_vec(bi, mb, na, d40);
    store_vec(bi, mb, nb, d41);
    store_vec(bi, mb + 1u, na, d50);
    store_vec(bi, mb + 1u, nb, d51);
    store_vec(bi, mb + 2u, na, d60);
    store_vec(bi, mb + 2u, nb, d61);
    store_vec(bi, mb + 3u, na, d70);
    store_vec(bi, mb + 3u, nb, d71);
}
