// Non-finite check: sets bit `p.bit` of flag[0] when any of the first `p.n` values (f32, or f16 packed two to a
// word) is NaN or infinite. Reads raw words and tests the exponent bits, so it needs no shader-f16 and no
// compiler can fold a `x != x` test away. A grid-stride loop: a few workgroups cover any tensor.

struct Params {
    n: u32,        // values to check
    half: u32,     // 1: f16 values, two per word; 0: f32
    bit: u32,      // the flag bit to set
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> flag: array<atomic<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let stride = groups.x * 256u;
    let words = select(p.n, (p.n + 1u) / 2u, p.half == 1u);
    var bad = false;
    for (var i = gid.x; i < words; i += stride) {
        let w = x[i];
        if (p.half == 1u) {
            // The high half of the last word is padding when n is odd.
            let hi_used = 2u * i + 1u < p.n;
            bad = bad || (w & 0x7c00u) == 0x7c00u || (hi_used && (w & 0x7c000000u) == 0x7c000000u);
        } else {
            bad = bad || (w & 0x7f800000u) == 0x7f800000u;
        }
    }
    if (bad) {
        atomicOr(&flag[0], 1u << p.bit);
    }
}
