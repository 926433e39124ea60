// Fused multi-head scaled-dot-product attention, softmax(Q K^T * scale) V, flash-attention style: K/V tiles
// stream through workgroup memory and each invocation keeps one query's running max, sum and output
// (online softmax), so the (lq, lk) score matrix never exists.
// Constants: D (head dim), DV = ceil(D / 4) (vec4s per head row), BKV (keys per tile), CAUSAL.

// Parameters and bindings: attention_common.wgsl, prepended.

const WG: u32 = 64u;
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
    let qi = wid.x * WG + lid;
    let h = wid.y;
    let b = wid.z;
    let valid = qi < p.lq;
    var qv: array<vec4<f32>, DV>;
    var o: array<vec4<f32>, DV>;
    if (valid) {
        let base = p.qo + b * p.bq + qi * p.sq + h * D;
        for (var i = 0u; i < DV; i++) {
            qv[i] = load4(base, i * 4u, 0u) * p.scale;
        }
    }
    var m = -1.0e30;
    var l = 0.0;
    var s: array<f32, BKV>;
    // With a causal mask no query of this workgroup looks past its last query.
    var kend = p.lk;
    if (CAUSAL) {
        kend = min(p.lk, wid.x * WG + WG);
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
        var mt = m;
        for (var j = 0u; j < nk; j++) {
            var dot_qk = 0.0;
            for (var i = 0u; i < DV; i++) {
                dot_qk += dot(qv[i], ks[j * DV + i]);
            }
            if (CAUSAL && k0 + j > qi) {
                dot_qk = -1.0e30;
            }
            s[j] = dot_qk;
            mt = max(mt, dot_qk);
        }
        let corr = exp(m - mt);
        l = l * corr;
        for (var i = 0u; i < DV; i++) {
            o[i] = o[i] * corr;
        }
        for (var j = 0u; j < nk; j++) {
            let pj = exp(s[j] - mt);
            l += pj;
            for (var i = 0u; i < DV; i++) {
                o[i] += pj * vs[j * DV + i];
            }
        }
        m = mt;
    }
    if (valid) {
        let base = b * p.bo + qi * p.so + h * D;
        let inv = 1.0 / l;
        for (var i = 0u; i < DV; i++) {
            let r = o[i] * inv;
            for (var c = 0u; c < 4u; c++) {
                if (i * 4u + c < D) {
                    out[base + i * 4u + c] = act(r[c]);
                }
            }
        }
    }
}
