// Converts f32 values to a weight dtype's GPU layout (crate/src/gpu/dtype.rs), so a weight computed on the GPU
// (a LoRA merged into it) is stored like an uploaded one, with no readback:
//   KIND 0: f16, two per u32 (pack2x16float: no shader-f16 needed);
//   KIND 1: q8_0 and KIND 2: q4_0, GGML's blocks of 32 (quantize_row_q8_0_ref / quantize_row_q4_0_ref): every
//           block's quants first, then every block's f16 scale, two per u32.
// One invocation per output u32 of f16, or per pair of blocks (the pair shares its scales' word).

struct Params {
    n: u32,       // values
    words: u32,   // f16: output words; quantized: pairs of blocks
    qwords: u32,  // quantized: words of quants (where the scales begin)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;         // (n)
@group(0) @binding(2) var<storage, read_write> out: array<u32>; // the dtype's layout of (n)

// C's roundf: halves away from zero (WGSL's round() rounds them to even).
fn round_away(v: f32) -> f32 {
    return sign(v) * floor(abs(v) + 0.5);
}

// Writes block b's q8_0 quants; returns its scale.
fn q8_0_block(b: u32) -> f32 {
    let base = b * 32u;
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        amax = max(amax, abs(x[base + i]));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    for (var w = 0u; w < 8u; w++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let q = i32(round_away(x[base + w * 4u + j] * id));
            word |= (u32(q) & 0xffu) << (8u * j);
        }
        out[b * 8u + w] = word;
    }
    return d;
}

// Writes block b's q4_0 quants (byte j: element j in the low nibble, j + 16 in the high one); returns its scale.
fn q4_0_block(b: u32) -> f32 {
    let base = b * 32u;
    var amax = 0.0;
    var m = 0.0;
    for (var i = 0u; i < 32u; i++) {
        let v = x[base + i];
        if (amax < abs(v)) {
            amax = abs(v);
            m = v;
        }
    }
    let d = m / -8.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    for (var w = 0u; w < 4u; w++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let k = w * 4u + j;
            let lo = min(15u, u32(x[base + k] * id + 8.5));
            let hi = min(15u, u32(x[base + k + 16u] * id + 8.5));
            word |= (lo | (hi << 4u)) << (8u * j);
        }
        out[b * 4u + w] = word;
    }
    return d;
}

fn block(b: u32) -> f32 {
    if (KIND == 1u) {
        return q8_0_block(b);
    }
    return q4_0_block(b);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 64u + lid;
    if (i >= p.words) {
        return;
    }
    if (KIND == 0u) {
        let a = x[2u * i];
        let b = select(0.0, x[min(2u * i + 1u, p.n - 1u)], 2u * i + 1u < p.n);
        out[i] = pack2x16float(vec2<f32>(a, b));
        return;
    }
    let blocks = p.n / 32u;
    let d0 = block(2u * i);
    var d1 = 0.0;
    if (2u * i + 1u < blocks) {
        d1 = block(2u * i + 1u);
    }
    out[p.qwords + i] = pack2x16float(vec2<f32>(d0, d1));
}
