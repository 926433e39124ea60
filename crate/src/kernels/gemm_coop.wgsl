// GEMM core on cooperative matrices (tensor cores): wgpu's experimental `wgpu_cooperative_matrix`, native
// Vulkan (VK_KHR_cooperative_matrix) and Metal only, used for f16 activations where the adapter offers
// S x S x S fragments of f16 inputs with f32 accumulators (launcher: ops/gemm.rs, Tile::Coop). Same loaders,
// fusions and epilogue as the portable core (gemm_common.wgsl), so the two are interchangeable.
//
// A workgroup computes a BM x BN tile of C with SGM x SGN subgroups of SG invocations; subgroup (sm, sn)
// owns FM x FN fragments: rows (FM sm + i) S.. and the column blocks coop_col_block(sn, j), half of them
// BN / 2 after the other half, so that GEGLU finds a hidden column and its gate in the same subgroup. Each step
// of BK = KF S along k converts the A and B tiles to f16 in workgroup memory (A column-major, B row-major),
// then every subgroup multiplies its fragments. The epilogue goes through workgroup memory: each subgroup
// stores a row of its fragments (f32) and its invocations apply bias, activation, residual or GEGLU and
// write C.
//
// The preamble provides: constants S, SG, SGM, SGN, FM, FN, KF (and BM = FM SGM S, BN = FN SGN S, BK = KF S),
// the aliases coop_a / coop_b / coop_c for coop_matSxS<f16, A> / <f16, B> / <f32, C>, and the entry point.

const WGS: u32 = SGM * SGN * SG;
var<workgroup> Ah: array<f16, BK * BM>;              // element (m, k) of the tile at k * BM + m
var<workgroup> Bh: array<f16, BK * BN>;              // element (k, n) of the tile at k * BN + n
var<workgroup> Cs: array<f32, SGM * SGN * FN * S * S>;  // per subgroup: S rows of FN fragments, row-major
var<workgroup> ln_mean: array<f32, BM>;              // AUX_LN: mean and 1/std of the tile's A rows
var<workgroup> ln_rstd: array<f32, BM>;

// AUX_LN: the mean and 1/std of the tile's A rows, once per workgroup: each subgroup takes rows in turn, its
// invocations stride along k (neighbours read neighbouring elements) and the subgroup sums (two passes).
fn coop_ln_stats(bi: u32, m0: u32, sg: u32, lane: u32) {
    for (var r = sg; r < BM; r += SGM * SGN) {
        var s = 0.0;
        for (var k = lane; k < p.k; k += SG) {
            s += load_a(bi, m0 + r, k);
        }
        let mean = subgroupAdd(s) / f32(p.k);
        var v = 0.0;
        for (var k = lane; k < p.k; k += SG) {
            let d = load_a(bi, m0 + r, k) - mean;
            v += d * d;
        }
        let rstd = inverseSqrt(subgroupAdd(v) / f32(p.k) + p.eps);
        if (lane == 0u) {
            ln_mean[r] = mean;
            ln_rstd[r] = rstd;
        }
    }
    workgroupBarrier();
}

fn coop_load_tiles(bi: u32, m0: u32, n0: u32, k0: u32, lid: u32) {
    for (var i = lid; i < BK * BM / 4u; i += WGS) {
        let slot = tile_slot(i, BM, A_K_FAST);
        let kk = slot.x;
        let q = slot.y;
        let k = k0 + kk;
        var v = load_a4(bi, m0 + q * 4u, k);
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
    if (B_K_FAST && B_VEC4) {
        // As in gemm.wgsl's fetch_b: four consecutive k of one column per invocation.
        for (var i = lid; i < BK * BN / 4u; i += WGS) {
            let kq = i % (BK / 4u);
            let nl = i / (BK / 4u);
            let v = load_b4(bi, k0 + 4u * kq, src_col(n0 + nl));
            let o = 4u * kq * BN + nl;
            Bh[o] = f16(v.x);
            Bh[o + BN] = f16(v.y);
            Bh[o + 2u * BN] = f16(v.z);
            Bh[o + 3u * BN] = f16(v.w);
        }
        return;
    }
    for (var i = lid; i < BK * BN / 4u; i += WGS) {
        let slot = tile_slot(i, BN, B_K_FAST);
        let kk = slot.x;
        let q = slot.y;
        let n = n0 + q * 4u;
        let k = k0 + kk;
        let o = kk * BN + q * 4u;
        Bh[o] = f16(load_b(bi, k, src_col(n)));
        Bh[o + 1u] = f16(load_b(bi, k, src_col(n + 1u)));
        Bh[o + 2u] = f16(load_b(bi, k, src_col(n + 2u)));
        Bh[o + 3u] = f16(load_b(bi, k, src_col(n + 3u)));
    }
}

// Column block (of S columns) of the tile behind fragment column j of subgroup column sn: a subgroup's first
// FN / 2 fragment columns lie in the tile's first half, the others BN / 2 further (GEGLU's gates).
fn coop_col_block(sn: u32, j: u32) -> u32 {
    let h = FN / 2u;
    return sn * h + j % h + (j / h) * SGN * h;
}

// The epilogue of fragment row i (rows m0 + (FM sm + i) S ..) of subgroup sg, once the subgroup has stored
// that row's FN fragments in its part of Cs (S rows of FN S, row-major).
fn coop_epilogue(bi: u32, m0: u32, n0: u32, sg: u32, lane: u32, i: u32) {
    let base = sg * FN * S * S;
    let sm = sg / SGN;
    let sn = sg % SGN;
    let mrow = m0 + (FM * sm + i) * S;
    if (GEGLU) {
        let h = FN / 2u;
        for (var e = lane; e < S * h * S; e += SG) {
            let r = e / (h * S);
            let cc = e % (h * S);
            let j = cc / S;
            let at = base + r * FN * S + cc;
            store_glu_one(bi, mrow + r, n0 + coop_col_block(sn, j) * S + cc % S, Cs[at], Cs[at + h * S]);
        }
        return;
    }
    for (var e = lane; e < S * FN * S; e += SG) {
        let r = e / (FN * S);
        let cc = e % (FN * S);
        store_one(bi, mrow + r, n0 + coop_col_block(sn, cc / S) * S + cc % S, Cs[base + e]);
    }
}

// The entry point, gemm_coop, is written out by ops/gemm.rs (coop_entry) for the tile's FM x FN fragments:
// WGSL has no arrays of cooperative matrices, so the accumulators are named variables.
