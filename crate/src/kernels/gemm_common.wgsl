// What the tiled GEMM cores (gemm.wgsl, portable; gemm_coop.wgsl, cooperative matrices) share: matmul and
// conv2d run on either (conv2d is an implicit GEMM: its A tile is gathered from the input image, never
// materialized as an im2col buffer).
//
//   C[b, m, n] = act(sum_k A(b, m, k) * B(b, k, n) + bias[off + b * sb + n]) (+ residual)
//
// The op's source provides the bindings a (1), b (2) and c (7) and
//   fn load_a(b: u32, m: u32, k: u32) -> f32     0 outside the matrix
//   fn load_a4(b: u32, m: u32, k: u32) -> vec4<f32>   A(m..m+3, k), 0 outside the matrix
//   fn load_b(b: u32, k: u32, n: u32) -> f32     0 outside the matrix
//   fn load_b4(b: u32, k: u32, n: u32) -> vec4<f32>   B(k..k+3, n) for k % 4 == 0, 0 outside the matrix;
//                                                used where B_K_FAST and the source's B_VEC4 (packed
//                                                weights: a word holds 2 to 8 of them)
//   fn c_index(b: u32, m: u32, n: u32) -> u32    where C[b, m, n] goes in c
// Constants: BM, BN, BK (workgroup tile), TM (portable core: micro-tile per invocation, 4 -> 4x4, 8 -> 8x8), and A_K_FAST /
// B_K_FAST: whether consecutive invocations walk k (else m / n) when loading a tile, so that global reads are
// contiguous for the operand's layout. Accumulators are named vec4 variables, not arrays: naga turns local
// arrays into memory round-trips.
//
// Fusions, each a constant, all reading the `aux` binding (so at most one at a time):
//   AUX_RES  adds aux[c_index(b, m, n)] after the activation: a residual connection.
//   AUX_LN   layer-normalizes A's rows before the product (matmul, A not transposed): aux is (gamma; beta),
//            (2, k). Each workgroup computes its rows' mean and variance first (two passes over the rows,
//            partial sums through the A tile's memory), so no extra workgroup memory is used.
//   (conv2d reads aux as a second input with AUX_CAT, and group-normalizes its input as it loads it with
//   GN_A; see conv2d.wgsl.)
//   SPLIT_K  (not with GEGLU) each workgroup sums one chunk of k and stores its raw sums, f32, at
//            c[chunk * batch * sc + c_index(b, m, n)]: c is the partial products' buffer (c_t is f32, else
//            act), and a second pass (gemm_reduce.wgsl) adds the chunks, the bias, the activation and the
//            residual. For GEMMs with too few output tiles to fill the GPU (see ops/gemm.rs).
//   GEGLU    (8x8 and coop tiles) B's columns (and the bias) are [hidden (n/2) | gate (n/2)] and C, n/2 wide, gets
//            hidden * gelu(gate): the GEMM's columns are permuted so that each invocation's two column blocks,
//            BN/2 apart, hold a hidden column and its gate.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    sa: u32,        // batch stride of A in elements (0: shared by the batch)
    sb: u32,        // batch stride of B in elements (0: shared by the batch)
    sc: u32,        // batch stride of C in elements
    qoff: u32,      // quantized B: offset of the scales in u32 words
    cin: u32,       // conv: input channels
    h: u32,         // conv: input height (of the 2x upsampled image with UP2)
    w: u32,         // conv: input width (likewise)
    wo: u32,        // conv: output width
    stride: u32,    // conv
    pad: u32,       // conv
    has_bias: u32,
    act: u32,       // activation code, see apply_act
    bias_off: u32,  // first bias element
    bias_sb: u32,   // batch stride of the bias (0: one bias row for the batch)
    split: u32,     // conv with AUX_CAT: channels read from a; the rest come from aux
    eps: f32,       // AUX_LN: layer norm epsilon
    groups: u32,    // conv with GN_A: the group norm's groups
    splits: u32,    // SPLIT_K: k chunks (workgroup z is batch item * splits + chunk)
    k_chunk: u32,   // SPLIT_K: k per chunk, a multiple of BK
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<act>;  // bias rows, bound to a dummy when has_bias is 0
@group(0) @binding(4) var<storage, read> aux: array<act>;   // see the fusions above; a dummy when none
@group(0) @binding(5) var<storage, read> gn_stats: array<f32>;  // conv with GN_A: (batch * groups, 2) mean, 1/std
@group(0) @binding(6) var<storage, read> gn_affine: array<act>; // conv with GN_A: (2, cin) gamma; beta

// SPLIT_K: where this workgroup's partial sums start in c (set by split_z).
var<private> part_base: u32;

// Workgroup z's (batch item, first k, end of k): its chunk of k with SPLIT_K, else all of it. A function of
// z and the uniform parameters only, so loops over the range stay in uniform control flow (barriers).
fn split_z(z: u32) -> vec3<u32> {
    if (!SPLIT_K) {
        return vec3<u32>(z, 0u, p.k);
    }
    let chunk = z % p.splits;
    let k_begin = chunk * p.k_chunk;
    part_base = chunk * p.batch * p.sc;
    return vec3<u32>(z / p.splits, k_begin, min(p.k, k_begin + p.k_chunk));
}

// Load iteration i of a (BK, width) tile in vec4s along m or n: (k in the tile, vec4 index). With k_fast,
// consecutive invocations walk k (contiguous for an operand stored k-fastest), else m or n.
fn tile_slot(i: u32, width: u32, k_fast: bool) -> vec2<u32> {
    if (k_fast) {
        return vec2<u32>(i % BK, i / BK);
    }
    return vec2<u32>(i / (width / 4u), i % (width / 4u));
}

// B(k..k+3, n) element by element: what load_b4 falls back to at the matrix's edge or off its word alignment.
fn b_col4(bi: u32, k: u32, n: u32) -> vec4<f32> {
    return vec4<f32>(load_b(bi, k, n), load_b(bi, k + 1u, n), load_b(bi, k + 2u, n), load_b(bi, k + 3u, n));
}

// Whether quantized B's four elements from flat index i = n * K + k, k % 4 == 0, lie in one word of quants
// (load_b4's fast case); else load_b4 falls back to b_col4.
fn b_whole_word(i: u32, k: u32, n: u32) -> bool {
    return n < p.n && k + 4u <= p.k && (i & 3u) == 0u;
}

// GEGLU: the B (and bias) column behind GEMM column n.
fn src_col(n: u32) -> u32 {
    if (!GEGLU || n >= p.n) {
        return n;
    }
    let half = BN / 2u;
    let g = n / BN;
    let j = n - g * BN;
    if (j < half) {
        return g * half + j;
    }
    return p.n / 2u + g * half + j - half;
}

fn bias_at(bi: u32, n: u32) -> f32 {
    if (p.has_bias == 0u) {
        return 0.0;
    }
    return f32(bias[p.bias_off + bi * p.bias_sb + n]);
}

// C[bi, m, n] = act(v + bias) (+ residual), if inside C.
fn store_one(bi: u32, m: u32, n: u32, v: f32) {
    if (m >= p.m || n >= p.n) {
        return;
    }
    let i = c_index(bi, m, n);
    if (SPLIT_K) {
        c[part_base + i] = c_t(v);
        return;
    }
    var r = apply_act(p.act, v + bias_at(bi, n));
    if (AUX_RES) {
        r += f32(aux[i]);
    }
    c[i] = c_t(r);
}

fn store_vec(bi: u32, m: u32, n: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        store_one(bi, m, n + j, v[j]);
    }
}

// GEGLU: row m, hidden GEMM column na (in the first half of its BN block) and its gate (BN / 2 later).
fn store_glu_one(bi: u32, m: u32, na: u32, h: f32, g: f32) {
    let half = p.n / 2u;
    let col = (na / BN) * (BN / 2u) + na % BN;
    if (m >= p.m || col >= half) {
        return;
    }
    let gate = g + bias_at(bi, half + col);
    c[c_index(bi, m, col)] = c_t((h + bias_at(bi, col)) * gelu_f32(gate));
}

// GEGLU: row m, hidden columns na.. (GEMM columns, in the first half of their block) and their gates.
fn store_glu(bi: u32, m: u32, na: u32, h: vec4<f32>, g: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        store_glu_one(bi, m, na + j, h[j], g[j]);
    }
}

