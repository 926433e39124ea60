// GEMM core on cooperative matrices (tensor cores): wgpu's experimental `wgpu_cooperative_matrix`, native
// Vulkan (VK_KHR_cooperative_matrix) and Metal only, used for f16 activations where the adapter offers
// S x S x S fragments of f16 inputs with f32 accumulators (launcher: ops/gemm.rs, Tile::Coop). Same loaders,
// fusions and epilogue as the portable core (gemm_common.wgsl), so the two are interchangeable.
//
// A workgroup computes a BM x BN tile of C with SGM x SGN subgroups of SG invocations; subgroup (sm, sn)
// owns 2 x 2 fragments: rows (2 sm + i) S.. and columns (sn + j SGN) S.. for i, j in {0, 1}, so its two
// column blocks are BN / 2 apart and GEGLU finds a hidden column and its gate in the same subgroup. Each step
// of BK = KF S along k converts the A and B tiles to f16 in workgroup memory (A column-major, B row-major, so
// that both are read with the layout the loaders write fast), then every subgroup multiplies its fragments.
// The epilogue goes through workgroup memory: each subgroup stores a row of its fragments (f32) and its
// invocations apply bias, activation, residual or GEGLU and write C.
//
// The preamble provides: constants S, SG, SGM, SGN, KF (and BM = 2 SGM S, BN = 2 SGN S, BK = KF S) and the
// aliases coop_a / coop_b / coop_c for coop_matSxS<f16, A> / <f16, B> / <f32, C>.

const WGS: u32 = SGM * SGN * SG;
var<workgroup> Ah: array<f16, BK * BM>;              // element (m, k) of the tile at k * BM + m
var<workgroup> Bh: array<f16, BK * BN>;              // element (k, n) of the tile at k * BN + n
var<workgroup> Cs: array<f32, SGM * SGN * 2u * S * S>;  // per subgroup: S rows of its two fragments, row-major
var<workgroup> ln_mean: array<f32, BM>;              // AUX_LN: mean and 1/std of the tile's A rows
var<workgroup> ln_rstd: array<f32, BM>;

// AUX_LN: each invocation computes whole rows (two passes over k), once per workgroup.
fn coop_ln_stats(bi: u32, m0: u32, lid: u32) {
    for (var r = lid; r < BM; r += WGS) {
        var s = 0.0;
        for (var k = 0u; k < p.k; k++) {
            s += load_a(bi, m0 + r, k);
        }
        let mean = s / f32(p.k);
        var v = 0.0;
        for (var k = 0u; k < p.k; k++) {
            let d = load_a(bi, m0 + r, k) - mean;
            v += d * d;
        }
        ln_mean[r] = mean;
        ln_rstd[r] = inverseSqrt(v / f32(p.k) + p.eps);
    }
    workgroupBarrier();
}

fn coop_load_tiles(bi: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    for (var i = lid; i < BK * BM / 4u; i += WGS) {
        var kk: u32;
        var q: u32;
        if (A_K_FAST) {
            kk = i % BK;
            q = i / BK;
        } else {
            q = i % (BM / 4u);
            kk = i / (BM / 4u);
        }
        let k = k0 + kk;
        var v = a_rows(bi, m0 + q * 4u, k);
        if (AUX_LN && k < p.k) {
            let r = q * 4u;
            let mean = vec4<f32>(ln_mean[r], ln_mean[r + 1u], ln_mean[r + 2u], ln_mean[r + 3u]);
            let rstd = vec4<f32>(ln_rstd[r], ln_rstd[r + 1u], ln_rstd[r + 2u], ln_rstd[r + 3u]);
            v = (v - mean) * rstd * f32(aux[k]) + f32(aux[p.k + k]);
        }
        let o = kk * BM + q * 4u;
        Ah[o] = f16(v.x);
        Ah[o + 1u] = f16(v.y);
        Ah[o + 2u] = f16(v.z);
        Ah[o + 3u] = f16(v.w);
    }
    for (var i = lid; i < BK * BN / 4u; i += WGS) {
        var kk: u32;
        var q: u32;
        if (B_K_FAST) {
            kk = i % BK;
            q = i / BK;
        } else {
            q = i % (BN / 4u);
            kk = i / (BN / 4u);
        }
        let n = n0 + q * 4u;
        let k = k0 + kk;
        let o = kk * BN + q * 4u;
        Bh[o] = f16(load_b(bi, k, src_col(n)));
        Bh[o + 1u] = f16(load_b(bi, k, src_col(n + 1u)));
        Bh[o + 2u] = f16(load_b(bi, k, src_col(n + 2u)));
        Bh[o + 3u] = f16(load_b(bi, k, src_col(n + 3u)));
    }
}

// Stores fragment row i (rows m0 + (2 sm + i) S ..) of subgroup sg through Cs and applies the epilogue.
fn coop_store_row(bi: u32, m0: u32, n0: u32, sg: u32, lane: u32, i: u32, h: coop_c, g: coop_c) {
    let base = sg * 2u * S * S;
    workgroupBarrier();
    coopStoreT(h, &Cs[base], 2u * S);
    coopStoreT(g, &Cs[base + S], 2u * S);
    workgroupBarrier();
    let sm = sg / SGN;
    let sn = sg % SGN;
    let mrow = m0 + (2u * sm + i) * S;
    if (GEGLU) {
        for (var e = lane; e < S * S; e += SG) {
            let r = e / S;
            let cc = e % S;
            store_glu_one(bi, mrow + r, n0 + sn * S + cc, Cs[base + r * 2u * S + cc], Cs[base + r * 2u * S + S + cc]);
        }
        return;
    }
    for (var e = lane; e < 2u * S * S; e += SG) {
        let r = e / (2u * S);
        let cc = e % (2u * S);
        let j = cc / S;
        store_one(bi, mrow + r, n0 + (sn + j * SGN) * S + cc % S, Cs[base + e]);
    }
}

@compute @workgroup_size(WGS)
fn gemm_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let bi = wid.z;
    let sm = sg / SGN;
    let sn = sg % SGN;
    if (AUX_LN) {
        coop_ln_stats(bi, m0, lid);
    }
    var c00 = coop_c();
    var c01 = coop_c();
    var c10 = coop_c();
    var c11 = coop_c();
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        coop_load_tiles(bi, m0, n0, k0, lid);
        workgroupBarrier();
        for (var kf = 0u; kf < KF; kf++) {
            let ak = kf * S * BM;
            let bk = kf * S * BN;
            let a0 = coopLoad<coop_a>(&Ah[ak + 2u * sm * S], BM);
            let a1 = coopLoad<coop_a>(&Ah[ak + (2u * sm + 1u) * S], BM);
            let b0 = coopLoadT<coop_b>(&Bh[bk + sn * S], BN);
            let b1 = coopLoadT<coop_b>(&Bh[bk + (sn + SGN) * S], BN);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }
    coop_store_row(bi, m0, n0, sg, lane, 0u, c00, c01);
    coop_store_row(bi, m0, n0, sg, lane, 1u, c10, c11);
}
