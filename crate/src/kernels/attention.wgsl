// Fused multi-head scaled-dot-product attention, softmax(Q K^T * scale) V, flash-attention style: K/V tiles
// stream through workgroup memory and each invocation keeps its queries' running max, sum and output (online
// softmax), so the (lq, lk) score matrix never exists.
// Constants: D (head dim), DV = ceil(D / 4) (vec4s per head row), BKV (keys per tile), QPI (queries per
// invocation: with two, each key read from the tile serves two queries and a workgroup loads the K/V tiles
// for twice as many queries, for twice the registers), CH (keys per online-softmax step, dividing BKV: their
// scores are held at once), CAUSAL.

// Parameters and bindings: attention_common.wgsl, prepended.

const WG: u32 = 64u;
const QPW: u32 = WG * QPI;  // queries per workgroup; invocation lid has lid, lid + WG, ...
var<workgroup> ks: array<vec4<f32>, BKV * DV>;  // (BKV, DV) keys of the tile
var<workgroup> vs: array<vec4<f32>, BKV * DV>;  // (BKV, DV) values of the tile

fn load4(base: u32, d: u32, which: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if (d + c < D) {
            switch which {
                case 0u: { r[c] = f32(q[base + d + c]); }
                case 1u: { r[c] = f32(k[base + d + c]); }
                default: { r[c] = f32(v[base + d + c]); }
            }
        }
    }
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    var qi: array<u32, QPI>;
    var qv: array<array<vec4<f32>, DV>, QPI>;
    var o: array<array<vec4<f32>, DV>, QPI>;
    var m: array<f32, QPI>;
    var l: array<f32, QPI>;
    for (var r = 0u; r < QPI; r++) {
        qi[r] = wid.x * QPW + r * WG + lid;
        m[r] = -1.0e30;
        if (qi[r] < p.lq) {
            let base = p.qo + b * p.bq + qi[r] * p.sq + h * D;
            for (var i = 0u; i < DV; i++) {
                qv[r][i] = load4(base, i * 4u, 0u) * p.scale;
            }
        }
    }
    // With a causal mask no query of this workgroup looks past its last query.
    var kend = p.lk;
    if (CAUSAL) {
        kend = min(p.lk, wid.x * QPW + QPW);
    }
    for (var k0 = 0u; k0 < kend; k0 += BKV) {
        workgroupBarrier();
        for (var i = lid; i < BKV * DV; i += WG) {
            let j = i / DV;
            let dv = i - j * DV;
            let key = k0 + j;
            if (key < p.lk) {
                ks[i] = load4(p.ko + b * p.bk + key * p.sk + h * D, dv * 4u, 1u);
                vs[i] = load4(p.vo + b * p.bv + key * p.sv + h * D, dv * 4u, 2u);
            } else {
                ks[i] = vec4<f32>(0.0);
                vs[i] = vec4<f32>(0.0);
            }
        }
        workgroupBarrier();
        let nk = min(BKV, p.lk - k0);
        // CH keys per step. With CAUSAL, keys after the query score -1e30; the first step holds key 0, which
        // every query sees, so from then on the running max is a real score and a masked key weighs
        // exp(-1e30 - max) = 0.
        for (var c0 = 0u; c0 < nk; c0 += CH) {
            let cn = min(CH, nk - c0);
            var s: array<array<f32, CH>, QPI>;
            var mt = m;
            for (var j = 0u; j < cn; j++) {
                let key = k0 + c0 + j;
                // Zeroed explicitly: in Chromium (Tint, SwiftShader) a declaration without initializer in a
                // loop body was zeroed once, not each time the body ran (the attention checks caught it).
                var dq = array<f32, QPI>();
                for (var i = 0u; i < DV; i++) {
                    let kv = ks[(c0 + j) * DV + i];
                    for (var r = 0u; r < QPI; r++) {
                        dq[r] += dot(qv[r][i], kv);
                    }
                }
                for (var r = 0u; r < QPI; r++) {
                    if (CAUSAL && key > qi[r]) {
                        dq[r] = -1.0e30;
                    }
                    s[r][j] = dq[r];
                    mt[r] = max(mt[r], dq[r]);
                }
            }
            for (var r = 0u; r < QPI; r++) {
                let corr = exp(m[r] - mt[r]);
                l[r] *= corr;
                for (var i = 0u; i < DV; i++) {
                    o[r][i] *= corr;
                }
            }
            for (var j = 0u; j < cn; j++) {
                var pj: array<f32, QPI>;
                for (var r = 0u; r < QPI; r++) {
                    pj[r] = exp(s[r][j] - mt[r]);
                    l[r] += pj[r];
                }
                for (var i = 0u; i < DV; i++) {
                    let vv = vs[(c0 + j) * DV + i];
                    for (var r = 0u; r < QPI; r++) {
                        o[r][i] += pj[r] * vv;
                    }
                }
            }
            m = mt;
        }
    }
    for (var r = 0u; r < QPI; r++) {
        if (qi[r] < p.lq) {
            let base = b * p.bo + qi[r] * p.so + h * D;
            let inv = 1.0 / l[r];
            for (var i = 0u; i < DV; i++) {
                let res = o[r][i] * inv;
                for (var c = 0u; c < 4u; c++) {
                    if (i * 4u + c < D) {
                        out[base + i * 4u + c] = act(res[c]);
                    }
                }
            }
        }
    }
}
