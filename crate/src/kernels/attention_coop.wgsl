// Multi-head attention, softmax(Q K^T * scale) V, flash-attention style on cooperative matrices (tensor
// cores; native only, f16 activations, see gemm_coop.wgsl), with attention.wgsl's parameters and bindings.
//
// A workgroup takes NSG * S queries of one head: each of its NSG subgroups owns S query rows. Blocks of BC
// keys stream through workgroup memory (K and V as f16, zero past the keys and the head dim). For each
// block a subgroup multiplies its queries by the keys on S x S fragments (the head dim padded to DP, a
// multiple of S), its invocations update each row's running max and sum (online softmax) and write the
// block's probabilities as f16, and the subgroup rescales its output rows and adds P V on fragments. The
// output rows live in workgroup memory (f32): a fragment's elements cannot be scaled by row in place.
//
// The preamble provides D, DP, S, SG, NSG, BC, CAUSAL and the aliases coop_a / coop_b / coop_c.

// Parameters and bindings: attention_common.wgsl, prepended.

const QB: u32 = NSG * S;    // queries per workgroup
const WGS: u32 = NSG * SG;
var<workgroup> Qs: array<f16, QB * DP>;   // (QB, DP) scaled queries, row-major
var<workgroup> Ks: array<f16, BC * DP>;   // (BC, DP) keys of the block, row-major
var<workgroup> Vs: array<f16, BC * DP>;   // (BC, DP) values of the block, row-major
var<workgroup> Ss: array<f32, QB * BC>;   // (QB, BC) scores of the block
var<workgroup> Ps: array<f16, QB * BC>;   // (QB, BC) their probabilities (unnormalized)
var<workgroup> Os: array<f32, QB * DP>;   // (QB, DP) output rows (unnormalized)
var<workgroup> Ms: array<f32, QB>;        // running max of each row's scores
var<workgroup> Ls: array<f32, QB>;        // running sum of each row's exp(score - max)
var<workgroup> Cr: array<f32, QB>;        // this block's correction of each row

@compute @workgroup_size(WGS)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let q0 = wid.x * QB;
    let h = wid.y;
    let b = wid.z;
    for (var e = lid; e < QB * DP; e += WGS) {
        let row = e / DP;
        let d = e % DP;
        let qi = q0 + row;
        var x = 0.0;
        if (qi < p.lq && d < D) {
            x = f32(q[p.qo + b * p.bq + qi * p.sq + h * D + d]) * p.scale;
        }
        Qs[e] = f16(x);
        Os[e] = 0.0;
    }
    for (var r = lid; r < QB; r += WGS) {
        Ms[r] = -1.0e30;
        Ls[r] = 0.0;
    }
    // With a causal mask no query of this workgroup looks past its last query.
    var kend = p.lk;
    if (CAUSAL) {
        kend = min(p.lk, q0 + QB);
    }
    let sq0 = sg * S;  // the subgroup's first row
    for (var k0 = 0u; k0 < kend; k0 += BC) {
        workgroupBarrier();
        for (var e = lid; e < BC * DP; e += WGS) {
            let j = e / DP;
            let d = e % DP;
            let key = k0 + j;
            var kx = 0.0;
            var vx = 0.0;
            if (key < p.lk && d < D) {
                kx = f32(k[p.ko + b * p.bk + key * p.sk + h * D + d]);
                vx = f32(v[p.vo + b * p.bv + key * p.sv + h * D + d]);
            }
            Ks[e] = f16(kx);
            Vs[e] = f16(vx);
        }
        workgroupBarrier();
        // Scores: (S, DP) queries times (DP, S) keys (Ks read column-major: element (d, key) at key DP + d).
        for (var kb = 0u; kb < BC / S; kb++) {
            var acc = coop_c();
            for (var df = 0u; df < DP / S; df++) {
                let a = coopLoadT<coop_a>(&Qs[sq0 * DP + df * S], DP);
                let bm = coopLoad<coop_b>(&Ks[kb * S * DP + df * S], DP);
                acc = coopMultiplyAdd(a, bm, acc);
            }
            coopStoreT(acc, &Ss[sq0 * BC + kb * S], BC);
        }
        workgroupBarrier();
        // Online softmax, one invocation per row.
        for (var r = lane; r < S; r += SG) {
            let row = sq0 + r;
            let qi = q0 + row;
            let m_old = Ms[row];
            var mx = m_old;
            for (var j = 0u; j < BC; j++) {
                let key = k0 + j;
                if (key < p.lk && (!CAUSAL || key <= qi)) {
                    mx = max(mx, Ss[row * BC + j]);
                }
            }
            let corr = exp(m_old - mx);
            var l = Ls[row] * corr;
            for (var j = 0u; j < BC; j++) {
                let key = k0 + j;
                var pj = 0.0;
                if (key < p.lk && (!CAUSAL || key <= qi)) {
                    pj = exp(Ss[row * BC + j] - mx);
                }
                l += pj;
                Ps[row * BC + j] = f16(pj);
            }
            Ms[row] = mx;
            Ls[row] = l;
            Cr[row] = corr;
        }
        workgroupBarrier();
        for (var e = lane; e < S * DP; e += SG) {
            let i = sq0 * DP + e;
            Os[i] *= Cr[sq0 + e / DP];
        }
        workgroupBarrier();
        // O += P V: (S, BC) probabilities times (BC, DP) values, a fragment of columns at a time.
        for (var df = 0u; df < DP / S; df++) {
            var acc = coopLoadT<coop_c>(&Os[sq0 * DP + df * S], DP);
            for (var kb = 0u; kb < BC / S; kb++) {
                let a = coopLoadT<coop_a>(&Ps[sq0 * BC + kb * S], BC);
                let bm = coopLoadT<coop_b>(&Vs[kb * S * DP + df * S], DP);
                acc = coopMultiplyAdd(a, bm, acc);
            }
            coopStoreT(acc, &Os[sq0 * DP + df * S], DP);
        }
    }
    workgroupBarrier();
    for (var e = lid; e < QB * D; e += WGS) {
        let row = e / D;
        let d = e % D;
        let qi = q0 + row;
        if (qi < p.lq) {
            out[b * p.bo + qi * p.so + h * D + d] = act(Os[row * DP + d] / Ls[row]);
        }
    }
}
