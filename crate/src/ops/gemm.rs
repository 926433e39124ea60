//! Matmul, linear layers and conv2d, all on one tiled GEMM kernel core (`kernels/gemm.wgsl`, or
//! `kernels/gemm_coop.wgsl` on cooperative matrices) with per-op operand loaders. The weight operand (B) may
//! be f32/f16 activations or packed f16, q8_0 or q4_0 weights.

use bytemuck::{Pod, Zeroable};

use super::{Activation, GnParams, check_act};
use crate::error::{Error, Result, shape_err};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor, grid_1d};

const COMMON: &str = include_str!("../kernels/common.wgsl");
const GEMM_COMMON: &str = include_str!("../kernels/gemm_common.wgsl");
const CORE: &str = include_str!("../kernels/gemm.wgsl");
const COOP: &str = include_str!("../kernels/gemm_coop.wgsl");
const B_ACT: &str = include_str!("../kernels/gemm_b_act.wgsl");
const B_F16: &str = include_str!("../kernels/gemm_b_f16.wgsl");
const B_Q8: &str = include_str!("../kernels/gemm_b_q8_0.wgsl");
const B_Q4: &str = include_str!("../kernels/gemm_b_q4_0.wgsl");
const MATMUL: &str = include_str!("../kernels/matmul.wgsl");
const CONV: &str = include_str!("../kernels/conv2d.wgsl");

macro_rules! gemm_kernels {
    ($core:ident, $suffix:literal) => {
        [
            [
                gemm_kernels!(@one "matmul_b_act", $suffix, $core, B_ACT, MATMUL),
                gemm_kernels!(@one "matmul_b_f16", $suffix, $core, B_F16, MATMUL),
                gemm_kernels!(@one "matmul_b_q8_0", $suffix, $core, B_Q8, MATMUL),
                gemm_kernels!(@one "matmul_b_q4_0", $suffix, $core, B_Q4, MATMUL),
            ],
            [
                gemm_kernels!(@one "conv2d_b_act", $suffix, $core, B_ACT, CONV),
                gemm_kernels!(@one "conv2d_b_f16", $suffix, $core, B_F16, CONV),
                gemm_kernels!(@one "conv2d_b_q8_0", $suffix, $core, B_Q8, CONV),
                gemm_kernels!(@one "conv2d_b_q4_0", $suffix, $core, B_Q4, CONV),
            ],
        ]
    };
    (@one $name:literal, $suffix:literal, $core:ident, $b:ident, $op:ident) => {
        Kernel {
            name: concat!($name, $suffix),
            sources: &[COMMON, GEMM_COMMON, $core, $b, $op],
            entry: "",
            inputs: 6,
            outputs: 1,
        }
    };
}

/// Kernels by [op][B operand kind]: the entry point is filled in from the tile.
const KERNELS: [[Kernel; 4]; 2] = gemm_kernels!(CORE, "");
/// The same on cooperative matrices ([`Tile::Coop`]).
const COOP_KERNELS: [[Kernel; 4]; 2] = gemm_kernels!(COOP, "_coop");

#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    sa: u32,
    sb: u32,
    sc: u32,
    qoff: u32,
    cin: u32,
    h: u32,
    w: u32,
    wo: u32,
    stride: u32,
    pad: u32,
    has_bias: u32,
    act: u32,
    bias_off: u32,
    bias_sb: u32,
    split: u32,
    eps: f32,
    groups: u32,
    splits: u32,
    k_chunk: u32,
    _pad: u32,
}

/// The split-K reduction's parameters (kernels/gemm_reduce.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct ReduceParams {
    total: u32,
    splits: u32,
    sc: u32,
    m: u32,
    cols: u32,
    has_bias: u32,
    act: u32,
    bias_off: u32,
    bias_sb: u32,
    _pad: [u32; 3],
}

const REDUCE: Kernel = Kernel {
    name: "gemm_reduce",
    sources: &[COMMON, include_str!("../kernels/gemm_reduce.wgsl")],
    entry: "gemm_reduce",
    inputs: 3,
    outputs: 1,
};

/// Split-K chosen by [`crate::gpu::Tuning::split_k_below`]: chunks of at least this many k steps (tiles
/// along k), so that each workgroup still streams a long run of k ...
const SPLIT_MIN_STEPS: u32 = 8;
/// ... and at most this many chunks (each one more copy of C to write and read back).
const SPLIT_MAX: u32 = 16;

/// The chunks of k a GEMM over `tiles` workgroups and `steps` k steps of its tile runs in: `requested` (at
/// most one per step), else as [`crate::gpu::Tuning::split_k_below`] (`below`) asks, with at most `room`
/// copies of the partial products in one buffer. 1: k whole, no second pass.
fn split_count(requested: Option<usize>, below: u32, room: u64, tiles: u32, steps: u32) -> u32 {
    let splits = match requested {
        Some(s) => s.min(steps as usize) as u32,
        None if tiles == 0 || tiles >= below => 1,
        None => {
            below.div_ceil(tiles).min(steps / SPLIT_MIN_STEPS).min(SPLIT_MAX).min(room.min(SPLIT_MAX as u64) as u32)
        }
    };
    // No empty chunks: as many as it takes at this chunk length.
    steps.div_ceil(steps.div_ceil(splits.max(1)).max(1)).max(1)
}

/// The chunks of k a GEMM with an (m, n) output per batch item over k runs in on (BM, BN, BK) tiles:
/// [`split_count`] with the device's tuning and limits.
fn chunks(ctx: &GpuContext, requested: Option<usize>, [bm, bn, bk]: [u32; 3], [m, n, k, batch]: [u32; 4]) -> u32 {
    let limits = ctx.limits();
    let c_bytes = 4 * batch as u64 * m as u64 * n as u64;
    let room = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) / c_bytes.max(1);
    let tiles = n.div_ceil(bn) * m.div_ceil(bm) * batch;
    split_count(requested, ctx.summary().tuning.split_k_below, room, tiles, k.div_ceil(bk))
}

/// The chunks of k a GEMM over k with an (m, n) output per batch item runs in on `tile` by default (1: k
/// whole): what `bench kernels` shows beside the tile.
pub fn split_k_chunks(ctx: &GpuContext, tile: Tile, (m, n, k, batch): (usize, usize, usize, usize)) -> usize {
    let (bm, bn, bk, ..) = tile.dims(ctx);
    chunks(ctx, None, [bm, bn, bk], [m, n, k, batch].map(|d| d as u32)) as usize
}

/// A workgroup tile of the GEMM core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 64x64 outputs per workgroup, 4x4 per invocation, 256 invocations.
    Small,
    /// 128x128 outputs per workgroup, 8x8 per invocation, 256 invocations.
    Large,
    /// Cooperative matrices (f16 activations on a device with [`GpuContext::coop`]): 2x2 subgroups of 2x2
    /// fragments each, so (4 S)x(4 S) outputs per workgroup: 64x64 with NVIDIA's and AMD's 16x16 fragments.
    Coop,
    /// Cooperative matrices, 2x2 subgroups of 4x4 fragments: (8 S)x(8 S) outputs per workgroup, 128x128 with
    /// 16x16 fragments (four times the work per loaded tile; needs the larger shapes to fill a GPU).
    CoopLarge,
}

/// Subgroups per coop workgroup, along m and n, and fragments along k per tile step.
const COOP_SGM: u32 = 2;
const COOP_SGN: u32 = 2;
const COOP_KF: u32 = 2;

/// The coop core's entry point for `fm` x `fn_` fragments per subgroup, written out: WGSL has no arrays of
/// cooperative matrices, so the accumulators are named variables (see kernels/gemm_coop.wgsl).
fn coop_entry(fm: u32, fn_: u32) -> String {
    use std::fmt::Write;
    let frags = || (0..fm).flat_map(move |i| (0..fn_).map(move |j| (i, j)));
    let mut s = String::from(
        "@compute @workgroup_size(WGS)
fn gemm_coop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let z = split_z(wid.z);
    let bi = z.x;
    let sm = sg / SGN;
    let sn = sg % SGN;
    if (AUX_LN) {
        coop_ln_stats(bi, m0, sg, lane);
    }
",
    );
    for (i, j) in frags() {
        let _ = writeln!(s, "    var c{i}_{j} = coop_c();");
    }
    s.push_str(
        "    for (var k0 = z.y; k0 < z.z; k0 += BK) {
        coop_load_tiles(bi, m0, n0, k0, lid);
        workgroupBarrier();
        for (var kf = 0u; kf < KF; kf++) {
            let ak = kf * S * BM;
            let bk = kf * S * BN;
",
    );
    for i in 0..fm {
        let _ = writeln!(s, "            let a{i} = coopLoad<coop_a>(&Ah[ak + (FM * sm + {i}u) * S], BM);");
    }
    for j in 0..fn_ {
        let _ = writeln!(s, "            let b{j} = coopLoadT<coop_b>(&Bh[bk + coop_col_block(sn, {j}u) * S], BN);");
    }
    for (i, j) in frags() {
        let _ = writeln!(s, "            c{i}_{j} = coopMultiplyAdd(a{i}, b{j}, c{i}_{j});");
    }
    s.push_str("        }\n        workgroupBarrier();\n    }\n");
    for i in 0..fm {
        s.push_str("    workgroupBarrier();\n");
        for j in 0..fn_ {
            let _ = writeln!(s, "    coopStoreT(c{i}_{j}, &Cs[sg * FN * S * S + {j}u * S], FN * S);");
        }
        let _ = writeln!(s, "    workgroupBarrier();\n    coop_epilogue(bi, m0, n0, sg, lane, {i}u);");
    }
    s.push_str("}\n");
    s
}

impl Tile {
    /// The tile for an (m, n) output: large tiles once there are enough of them to fill a big GPU.
    pub fn for_shape(m: usize, n: usize, batch: usize) -> Tile {
        let large_tiles = m.div_ceil(128) * n.div_ceil(128) * batch;
        if m >= 128 && n >= 128 && large_tiles >= 128 { Tile::Large } else { Tile::Small }
    }

    /// The tile a GEMM with `dtype` activations and an (m, n) output per batch element runs on when none is
    /// chosen (see `pick`).
    pub fn default_for(ctx: &GpuContext, dtype: DType, (m, n, batch): (usize, usize, usize)) -> Tile {
        Self::pick(ctx, "", dtype, None, [m, n, batch]).unwrap_or(Tile::for_shape(m, n, batch))
    }

    pub fn is_coop(self) -> bool {
        matches!(self, Tile::Coop | Tile::CoopLarge)
    }

    /// A coop tile's fragments per subgroup along m and along n (0 for the portable tiles).
    fn coop_frags(self) -> u32 {
        match self {
            Tile::Coop => 2,
            Tile::CoopLarge => 4,
            Tile::Small | Tile::Large => 0,
        }
    }

    /// The tile a GEMM with `dtype` activations runs on: `chosen` if given, cooperative matrices for f16
    /// where the device has them, else by shape.
    fn pick(ctx: &GpuContext, op: &'static str, dtype: DType, chosen: Option<Tile>, shape: [usize; 3]) -> Result<Tile> {
        let coop = ctx.coop().filter(|_| dtype == DType::F16);
        let limit = ctx.summary().max_compute_workgroup_storage_size as usize;
        // The coop tiles' workgroup memory: f16 A and B tiles, each subgroup's row of f32 fragments, row
        // statistics.
        let fits = |t: Tile| {
            coop.is_some_and(|c| {
                let (s, sg, f) = (c.size as usize, (COOP_SGM * COOP_SGN) as usize, t.coop_frags() as usize);
                let (bm, bk) = (f * COOP_SGM as usize * s, COOP_KF as usize * s);
                2 * 2 * bk * bm + 4 * sg * f * s * s + 8 * bm <= limit
            })
        };
        match chosen {
            Some(t) if t.is_coop() && !fits(t) => Err(Error::Invalid(format!(
                "{op}: the {t:?} tile needs f16 activations on a device with cooperative matrices and the \
                     workgroup memory for it ({dtype} activations; cooperative matrices: {}; workgroup memory: \
                     {limit} bytes)",
                if ctx.coop().is_some() { "yes" } else { "no" }
            ))),
            Some(t) => Ok(t),
            None if fits(Tile::Coop) => {
                let large = coop.map_or(0, |c| (Tile::CoopLarge.coop_frags() * COOP_SGM * c.size) as usize);
                let wgs = shape[0].div_ceil(large) * shape[1].div_ceil(large) * shape[2];
                Ok(if wgs >= 256 && fits(Tile::CoopLarge) { Tile::CoopLarge } else { Tile::Coop })
            }
            None => Ok(Tile::for_shape(shape[0], shape[1], shape[2])),
        }
    }

    /// (BM, BN, BK, entry point) and the rest of the tile's specialization.
    fn dims(self, ctx: &GpuContext) -> (u32, u32, u32, &'static str, Spec) {
        match self {
            Tile::Small | Tile::Large => {
                let (b, tm, entry) = if self == Tile::Small { (64, 4, "gemm_4x4") } else { (128, 8, "gemm_8x8") };
                let (tuning, bk) = (ctx.summary().tuning, 16);
                // Double buffering where two f32 tiles of A and of B fit the workgroup memory (the 64x64
                // tile's 16 KiB is WebGPU's default limit; the 128x128 tile's 32 KiB needs more).
                let double = 2 * 4 * bk * (b + b) <= ctx.summary().max_compute_workgroup_storage_size;
                let nbuf = if tuning.gemm_double_buffer && double { 2 } else { 1 };
                let spec = Spec::default().u32("TM", tm).flag("PREFETCH", tuning.gemm_prefetch).u32("NBUF", nbuf);
                (b, b, bk, entry, spec)
            }
            Tile::Coop | Tile::CoopLarge => {
                let c = ctx.coop().expect("Tile::pick checked");
                let (s, f) = (c.size, self.coop_frags());
                let spec = c
                    .spec()
                    .u32("SGM", COOP_SGM)
                    .u32("SGN", COOP_SGN)
                    .u32("FM", f)
                    .u32("FN", f)
                    .u32("KF", COOP_KF)
                    .code(coop_entry(f, f));
                (f * COOP_SGM * s, f * COOP_SGN * s, COOP_KF * s, "gemm_coop", spec)
            }
        }
    }
}

/// How the B operand is read, by its dtype relative to the activations.
fn b_kind(op: &'static str, a: DType, b: &Tensor, k_fast: bool) -> Result<usize> {
    let kind = match (a, b.dtype()) {
        (x, y) if x == y => 0,
        (DType::F32, DType::F16) => 1,
        (_, DType::Q8_0) => 2,
        (_, DType::Q4_0) => 3,
        (_, d) => {
            return Err(Error::DType {
                op,
                dtype: d,
                detail: format!(" weights {:?} with {a} activations (convert the weights to {a})", b.shape()),
            });
        }
    };
    if kind >= 2 && !k_fast {
        return Err(Error::DType {
            op,
            dtype: b.dtype(),
            detail: format!(": quantized {:?} must be the transposed (n, k) operand", b.shape()),
        });
    }
    Ok(kind)
}

/// Checks that `bias` holds a row of `n` at `at.0` for each of `batch` items `at.1` apart.
fn check_bias(
    op: &'static str,
    bias: Option<&Tensor>,
    at: (usize, usize),
    n: usize,
    batch: usize,
    a: DType,
) -> Result<()> {
    if let Some(bias) = bias {
        let (off, stride) = at;
        let end = off + stride * batch.saturating_sub(1) + n;
        let fits = if at == (0, 0) { bias.shape() == [n] } else { bias.numel() >= end };
        if !fits {
            return shape_err(
                op,
                format!("bias {:?} has no row of {n} at {off} (batch stride {stride}, batch {batch})", bias.shape()),
            );
        }
        if bias.dtype() != a {
            return Err(Error::DType { op, dtype: bias.dtype(), detail: format!(": bias must be {a}") });
        }
    }
    Ok(())
}

/// Checks that a fused residual has the output's shape and dtype.
fn check_residual(op: &'static str, residual: Option<&Tensor>, out: &[usize], a: DType) -> Result<()> {
    match residual {
        Some(r) if r.shape() != out || r.dtype() != a => {
            shape_err(op, format!("residual {:?} {} does not match the output {out:?} {a}", r.shape(), r.dtype()))
        }
        _ => Ok(()),
    }
}

/// Options of [`matmul`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MatmulOpts<'a> {
    /// A is stored (.., k, m).
    pub trans_a: bool,
    /// B is stored (.., n, k), as a linear layer's weight.
    pub trans_b: bool,
    /// Added to every row: shape (n), or with `bias_at` a row inside a larger tensor.
    pub bias: Option<&'a Tensor>,
    /// (offset, batch stride) of the bias row in `bias`'s elements: (0, 0) is the whole (n) tensor for every
    /// batch item.
    pub bias_at: (usize, usize),
    /// Applied after the bias.
    pub act: Option<Activation>,
    /// Layer norm of A's rows before the product (fused when A is not transposed).
    pub layer_norm: Option<&'a LnParams>,
    /// B's n columns (and the bias) are [hidden | gate] and the result, n / 2 wide, is hidden * gelu(gate):
    /// diffusers' GEGLU feed-forward projection. Fused when n is a multiple of 128.
    pub geglu: bool,
    /// Added to the result after the activation (a residual connection), in the result's layout.
    pub residual: Option<&'a Tensor>,
    /// The result is stored transposed, (.., n, m): tokens back to channels-first images.
    pub trans_c: bool,
    /// Overrides the tile choice (tests use it to cover every tile).
    pub tile: Option<Tile>,
    /// Overrides split-K's choice of chunks of k (tests use it to cover the split path; `Some(1)`: k whole).
    /// Not with GEGLU.
    pub split_k: Option<usize>,
}

/// A layer norm's scale and shift, also packed as one (2, dim) tensor (gamma; beta) for the kernels that
/// fuse the norm into what follows it.
#[derive(Clone, Debug)]
pub struct LnParams {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub packed: Tensor,
    pub eps: f32,
}

impl LnParams {
    pub fn new(ctx: &GpuContext, gamma: Tensor, beta: Tensor, eps: f32) -> Result<Self> {
        let dim = gamma.numel();
        let packed = super::concat(ctx, &gamma, &beta, 0)?.reshape(&[2, dim])?;
        Ok(Self { gamma, beta, packed, eps })
    }
}

fn act_code(act: Option<Activation>) -> u32 {
    match act {
        None => 0,
        Some(Activation::Silu) => 1,
        Some(Activation::Gelu) => 2,
        Some(Activation::QuickGelu) => 3,
        Some(Activation::Relu) => 4,
    }
}

/// Splits a shape into (batch dims, rows, cols).
fn split_matrix(t: &Tensor) -> Option<(&[usize], usize, usize)> {
    let s = t.shape();
    (s.len() >= 2).then(|| (&s[..s.len() - 2], s[s.len() - 2], s[s.len() - 1]))
}

/// Batched matrix product C = A B (+ bias) (activation) with the fusions of [`MatmulOpts`]. A is (.., m, k),
/// B is (.., k, n); either may have no batch dimensions and is then shared by the other's batch.
pub fn matmul(ctx: &GpuContext, a: &Tensor, b: &Tensor, opts: MatmulOpts<'_>) -> Result<Tensor> {
    const OP: &str = "matmul";
    check_act(OP, &[a])?;
    let (Some((ba, ra, ca)), Some((bb, rb, cb))) = (split_matrix(a), split_matrix(b)) else {
        return shape_err(OP, format!("operands must be at least 2-D, got {:?} and {:?}", a.shape(), b.shape()));
    };
    let (m, k) = if opts.trans_a { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if opts.trans_b { (cb, rb) } else { (rb, cb) };
    if k != kb {
        return shape_err(
            OP,
            format!(
                "inner dimensions differ: {:?}{} x {:?}{}",
                a.shape(),
                if opts.trans_a { "^T" } else { "" },
                b.shape(),
                if opts.trans_b { "^T" } else { "" }
            ),
        );
    }
    let batch_dims = match (ba.is_empty(), bb.is_empty()) {
        (_, true) => ba,
        (true, false) => bb,
        (false, false) if ba == bb => ba,
        _ => {
            return shape_err(OP, format!("batch dimensions differ: {:?} x {:?}", a.shape(), b.shape()));
        }
    };
    if b.dtype().is_quantized() && !bb.is_empty() {
        return shape_err(OP, format!("quantized B {:?} cannot be batched", b.shape()));
    }
    let batch: usize = batch_dims.iter().product();
    check_bias(OP, opts.bias, opts.bias_at, n, batch, a.dtype())?;
    if opts.layer_norm.is_some() && opts.residual.is_some() {
        return shape_err(OP, "a matmul cannot fuse both a layer norm and a residual");
    }
    if opts.geglu && (n % 2 != 0 || opts.trans_c || opts.residual.is_some() || opts.act.is_some()) {
        return shape_err(OP, format!("GEGLU needs an even n ({n}) and no transposed result, residual or activation"));
    }
    if opts.geglu && opts.split_k.is_some_and(|s| s > 1) {
        return shape_err(OP, "GEGLU's paired columns cannot be split along k");
    }
    if let Some(ln) = opts.layer_norm
        && (ln.packed.shape() != [2, k] || ln.packed.dtype() != a.dtype() || opts.trans_a)
    {
        return shape_err(
            OP,
            format!("layer norm parameters {:?} do not fit rows of k = {k} (A not transposed)", ln.packed.shape()),
        );
    }
    let kind = b_kind(OP, a.dtype(), b, opts.trans_b)?;
    let cols = if opts.geglu { n / 2 } else { n };
    let mut out_shape = batch_dims.to_vec();
    out_shape.extend(if opts.trans_c { [cols, m] } else { [m, cols] });
    check_residual(OP, opts.residual, &out_shape, a.dtype())?;
    if ctx.is_cpu() {
        return super::cpu::matmul(a, b, &opts, batch, &out_shape);
    }
    // A GEGLU the kernel cannot fuse runs as two ops.
    if opts.geglu && !n.is_multiple_of(128) {
        let h = matmul(ctx, a, b, MatmulOpts { geglu: false, ..opts })?;
        return super::geglu(ctx, &h);
    }
    let out = Tensor::empty(ctx, OP, &out_shape, a.dtype())?;
    let params = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        batch: batch as u32,
        sa: if ba.is_empty() { 0 } else { (m * k) as u32 },
        sb: if bb.is_empty() { 0 } else { (k * n) as u32 },
        sc: (m * cols) as u32,
        qoff: (b.dtype().scales_offset(b.numel()) / 4) as u32,
        has_bias: opts.bias.is_some() as u32,
        act: act_code(opts.act),
        bias_off: opts.bias_at.0 as u32,
        bias_sb: opts.bias_at.1 as u32,
        eps: opts.layer_norm.map_or(0.0, |ln| ln.eps),
        ..Default::default()
    };
    let tile = Tile::pick(ctx, OP, a.dtype(), opts.tile, [m, n, batch])?;
    // GEGLU pairs columns BN / 2 apart within a block: the 8x8 tile's blocks, or the coop tile's.
    let tile = if opts.geglu && !tile.is_coop() { Tile::Large } else { tile };
    let fuse = Fuse {
        residual: opts.residual.is_some(),
        layer_norm: opts.layer_norm.is_some(),
        geglu: opts.geglu,
        ..Default::default()
    };
    let spec = |spec: Spec| {
        spec.flag("A_TRANS", opts.trans_a)
            .flag("A_K_FAST", !opts.trans_a)
            .flag("B_K_FAST", opts.trans_b)
            .flag("C_TRANS", opts.trans_c)
    };
    let aux = opts.residual.or(opts.layer_norm.map(|ln| &ln.packed));
    let gemm = Gemm { op: OP, op_index: 0, b_kind: kind, tile, fuse, c_trans: opts.trans_c, split_k: opts.split_k };
    launch(ctx, gemm, spec, params, [a, b], opts.bias, aux, None, &out)?;
    Ok(out)
}

/// Which of the GEMM core's fusions a launch uses (kernels/gemm.wgsl).
#[derive(Clone, Copy, Default)]
struct Fuse {
    residual: bool,
    layer_norm: bool,
    geglu: bool,
    concat: bool,
    upsample: bool,
    /// Some(silu) when a conv group-normalizes its input as it loads it.
    group_norm: Option<bool>,
}

impl Fuse {
    fn flags(self, spec: Spec) -> Spec {
        spec.flag("AUX_RES", self.residual)
            .flag("AUX_LN", self.layer_norm)
            .flag("GEGLU", self.geglu)
            .flag("AUX_CAT", self.concat)
            .flag("UP2", self.upsample)
            .flag("GN_A", self.group_norm.is_some())
            .flag("GN_SILU", self.group_norm == Some(true))
    }
}

/// A linear layer: x (.., in) times weight (out, in) transposed, plus bias (out).
pub fn linear(ctx: &GpuContext, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_act(ctx, x, weight, bias, None)
}

/// [`linear`] followed by an activation, fused.
pub fn linear_act(
    ctx: &GpuContext,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor> {
    linear_with(ctx, x, weight, MatmulOpts { bias, act, ..Default::default() })
}

/// A linear layer with the fusions of `opts` (its `trans_b` is set here): x (.., in) times weight
/// (out, in) transposed. The result is (.., out), (.., out / 2) with GEGLU, or with `trans_c` (batch, out,
/// tokens) for x (batch, tokens, in).
pub fn linear_with(ctx: &GpuContext, x: &Tensor, weight: &Tensor, opts: MatmulOpts<'_>) -> Result<Tensor> {
    if x.rank() == 0 || weight.rank() != 2 || x.dim(-1) != weight.dim(1) || (opts.trans_c && x.rank() != 3) {
        return shape_err(
            "linear",
            format!("input {:?} does not fit weight {:?} (out, in)", x.shape(), weight.shape()),
        );
    }
    let opts = MatmulOpts { trans_b: true, ..opts };
    if opts.trans_c {
        return matmul(ctx, x, weight, opts);
    }
    let rows = x.numel() / x.dim(-1);
    let x2 = x.reshape(&[rows, x.dim(-1)])?;
    let residual = opts.residual.map(|r| r.reshape(&[rows, r.numel() / rows.max(1)])).transpose()?;
    let out = matmul(ctx, &x2, weight, MatmulOpts { residual: residual.as_ref(), ..opts })?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = out.dim(-1);
    out.reshape(&shape)
}

/// Options of [`conv2d`].
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOpts<'a> {
    pub stride: usize,
    /// Zero padding before (top, left).
    pub padding: usize,
    /// Zero padding after (bottom, right), when it differs from `padding` (the VAE encoder's downsampler
    /// pads (0, 1, 0, 1)).
    pub padding_end: Option<usize>,
    pub act: Option<Activation>,
    /// (offset, batch stride) of the bias row, as [`MatmulOpts::bias_at`]: a ResNet's conv takes its bias
    /// and the time embedding's projection as one per-sample row.
    pub bias_at: (usize, usize),
    /// Added after the activation, in the output's shape: a residual connection.
    pub residual: Option<&'a Tensor>,
    /// More input channels, after x's: the conv runs over concat(x, more) on the channel axis without the
    /// concatenation being made.
    pub concat: Option<&'a Tensor>,
    /// The conv runs over x upsampled 2x (nearest) without the upsampled image being made.
    pub upsample: bool,
    /// The input (x, or the concatenation) group-normalized as it is loaded: the `norm -> SiLU -> conv` of
    /// every ResNet block without the normalized image being made.
    pub norm: Option<GnInput<'a>>,
    pub tile: Option<Tile>,
    /// As [`MatmulOpts::split_k`].
    pub split_k: Option<usize>,
}

/// A conv input's group norm: its parameters, its statistics ([`super::group_norm_stats`]) and whether SiLU
/// follows.
#[derive(Clone, Copy, Debug)]
pub struct GnInput<'a> {
    pub params: &'a GnParams,
    pub stats: &'a Tensor,
    pub silu: bool,
}

impl Default for Conv2dOpts<'_> {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            padding_end: None,
            act: None,
            bias_at: (0, 0),
            residual: None,
            concat: None,
            upsample: false,
            norm: None,
            tile: None,
            split_k: None,
        }
    }
}

/// 2-D convolution, NCHW: x (batch, cin, h, w), weight (cout, cin, kh, kw) or, for quantized weights,
/// (cout, cin * kh * kw) with `kernel` giving (kh, kw); bias (cout). With `opts.concat` the input channels
/// are x's then the concatenated tensor's; with `opts.upsample` the input is x upsampled 2x.
pub fn conv2d(
    ctx: &GpuContext,
    x: &Tensor,
    weight: &Tensor,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    opts: Conv2dOpts<'_>,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    check_act(OP, &[x])?;
    let (kh, kw) = kernel;
    let &[batch, cx, hx, wx] = x.shape() else {
        return shape_err(OP, format!("input must be (batch, channels, height, width), got {:?}", x.shape()));
    };
    let extra = match opts.concat {
        None => 0,
        Some(more) => {
            check_act(OP, &[x, more])?;
            if more.rank() != 4 || more.dim(0) != batch || more.shape()[2..] != x.shape()[2..] {
                return shape_err(OP, format!("cannot concatenate {:?} to input {:?}", more.shape(), x.shape()));
            }
            if opts.residual.is_some() {
                return shape_err(OP, "a conv over a concatenation cannot also add a residual");
            }
            more.dim(1)
        }
    };
    let cin = cx + extra;
    let (h, w) = if opts.upsample { (2 * hx, 2 * wx) } else { (hx, wx) };
    let cout = weight.shape().first().copied().unwrap_or(0);
    let fits = match *weight.shape() {
        [_, c, y, x] => c == cin && y == kh && x == kw,
        [_, kk] => kk == cin * kh * kw,
        _ => false,
    };
    if !fits || kh == 0 || kw == 0 || opts.stride == 0 {
        return shape_err(
            OP,
            format!(
                "weight {:?} does not fit input {:?}{} with a {kh}x{kw} kernel, stride {}",
                weight.shape(),
                x.shape(),
                if extra > 0 { format!(" + {extra} channels") } else { String::new() },
                opts.stride
            ),
        );
    }
    let pads = opts.padding + opts.padding_end.unwrap_or(opts.padding);
    if h + pads < kh || w + pads < kw {
        return shape_err(OP, format!("input {:?} is smaller than the {kh}x{kw} kernel", x.shape()));
    }
    let ho = (h + pads - kh) / opts.stride + 1;
    let wo = (w + pads - kw) / opts.stride + 1;
    check_bias(OP, bias, opts.bias_at, cout, batch, x.dtype())?;
    check_residual(OP, opts.residual, &[batch, cout, ho, wo], x.dtype())?;
    if let Some(n) = &opts.norm {
        let g = n.params.groups;
        if g == 0 || !cin.is_multiple_of(g) || n.params.packed.shape() != [2, cin] || n.stats.shape() != [batch * g, 2]
        {
            return shape_err(
                OP,
                format!(
                    "a group norm of {:?} with statistics {:?} does not fit {cin} input channels in {g} groups",
                    n.params.gamma.shape(),
                    n.stats.shape()
                ),
            );
        }
    }
    let kind = b_kind(OP, x.dtype(), weight, true)?;
    if ctx.is_cpu() {
        return super::cpu::conv2d(x, weight, cout, cin, (kh, kw), bias, &opts);
    }
    let out = Tensor::empty(ctx, OP, &[batch, cout, ho, wo], x.dtype())?;
    let m = ho * wo;
    let params = Params {
        m: m as u32,
        n: cout as u32,
        k: (cin * kh * kw) as u32,
        batch: batch as u32,
        sa: (cx * hx * wx) as u32,
        sb: 0,
        sc: (cout * m) as u32,
        qoff: (weight.dtype().scales_offset(weight.numel()) / 4) as u32,
        cin: cin as u32,
        h: h as u32,
        w: w as u32,
        wo: wo as u32,
        stride: opts.stride as u32,
        pad: opts.padding as u32,
        has_bias: bias.is_some() as u32,
        act: act_code(opts.act),
        bias_off: opts.bias_at.0 as u32,
        bias_sb: opts.bias_at.1 as u32,
        split: cx as u32,
        eps: 0.0,
        groups: opts.norm.map_or(1, |n| n.params.groups) as u32,
        ..Default::default()
    };
    let tile = Tile::pick(ctx, OP, x.dtype(), opts.tile, [m, cout, batch])?;
    let fuse = Fuse {
        residual: opts.residual.is_some(),
        concat: opts.concat.is_some(),
        upsample: opts.upsample,
        group_norm: opts.norm.map(|n| n.silu),
        ..Default::default()
    };
    let spec = |spec: Spec| {
        spec.flag("A_TRANS", false)
            .flag("A_K_FAST", false)
            .flag("B_K_FAST", true)
            .flag("C_TRANS", false)
            .u32("KH", kh as u32)
            .u32("KW", kw as u32)
    };
    let aux = opts.residual.or(opts.concat);
    let gn = opts.norm.map(|n| [n.stats, &n.params.packed]);
    let gemm = Gemm { op: OP, op_index: 1, b_kind: kind, tile, fuse, c_trans: true, split_k: opts.split_k };
    launch(ctx, gemm, spec, params, [x, weight], bias, aux, gn, &out)?;
    Ok(out)
}

/// What a GEMM launch runs: the op (for errors and costs) and its kernel by [op][B kind], the tile, the
/// fusions, whether C is stored (batch, n, m) (a conv's output, or `trans_c`), and a split-K override.
struct Gemm {
    op: &'static str,
    op_index: usize,
    b_kind: usize,
    tile: Tile,
    fuse: Fuse,
    c_trans: bool,
    split_k: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &GpuContext,
    gemm: Gemm,
    spec: impl FnOnce(Spec) -> Spec,
    mut params: Params,
    [a, b]: [&Tensor; 2],
    bias: Option<&Tensor>,
    aux: Option<&Tensor>,
    group_norm: Option<[&Tensor; 2]>,
    out: &Tensor,
) -> Result<()> {
    let Gemm { op, op_index, b_kind, tile, fuse, c_trans, split_k } = gemm;
    let (bm, bn, bk, entry, base) = tile.dims(ctx);
    let table = if tile.is_coop() { &COOP_KERNELS } else { &KERNELS };
    let kernel = Kernel { entry, ..table[op_index][b_kind] };
    let spec = spec(Spec { f16: a.dtype() == DType::F16, ..base }.u32("BM", bm).u32("BN", bn).u32("BK", bk));
    let dummy = Tensor::empty(ctx, op, &[1], a.dtype())?;
    let [stats, affine] = group_norm.unwrap_or([&dummy, &dummy]);
    let mut groups = [params.n.div_ceil(bn), params.m.div_ceil(bm), params.batch];
    ctx.count_flops(op, 2 * params.m as u64 * params.n as u64 * params.k as u64 * params.batch as u64);
    let total = params.batch * params.sc;
    let shape = [params.m, params.n, params.k, params.batch];
    let splits = if fuse.geglu { 1 } else { chunks(ctx, split_k, [bm, bn, bk], shape) };
    if splits <= 1 {
        let spec = fuse.flags(spec).flag("SPLIT_K", false).alias("c_t", "act");
        let inputs = [a, b, bias.unwrap_or(&dummy), aux.unwrap_or(&dummy), stats, affine];
        return ctx.dispatch(op, &kernel, &spec, bytemuck::bytes_of(&params), &inputs, &[out], groups);
    }
    // Split-K: each chunk's raw sums into its copy of C (f32), then the epilogue over their sum.
    let part = Tensor::empty(ctx, op, &[splits as usize * total as usize], DType::F32)?;
    let reduce = ReduceParams {
        total,
        splits,
        sc: params.sc,
        m: params.m,
        cols: params.sc.checked_div(params.m).unwrap_or(1),
        has_bias: params.has_bias,
        act: params.act,
        bias_off: params.bias_off,
        bias_sb: params.bias_sb,
        ..Default::default()
    };
    let k_chunk = params.k.div_ceil(bk).div_ceil(splits) * bk;
    (params.splits, params.k_chunk, params.has_bias, params.act) = (splits, k_chunk, 0, 0);
    groups[2] *= splits;
    let spec = Fuse { residual: false, ..fuse }.flags(spec).flag("SPLIT_K", true).alias("c_t", "f32");
    // The residual is added by the second pass; a concatenation or a layer norm's parameters stay.
    let aux_a = if fuse.residual { &dummy } else { aux.unwrap_or(&dummy) };
    let inputs = [a, b, &dummy, aux_a, stats, affine];
    ctx.dispatch(op, &kernel, &spec, bytemuck::bytes_of(&params), &inputs, &[&part], groups)?;
    let spec = Spec::new(a.dtype() == DType::F16).flag("C_TRANS", c_trans).flag("AUX_RES", fuse.residual);
    let residual = if fuse.residual { aux.unwrap_or(&dummy) } else { &dummy };
    let inputs = [&part, bias.unwrap_or(&dummy), residual];
    let groups = grid_1d(ctx, total.div_ceil(256));
    ctx.dispatch(op, &REDUCE, &spec, bytemuck::bytes_of(&reduce), &inputs, &[out], groups)
}

#[cfg(test)]
mod tests {
    use super::split_count;

    #[test]
    fn split_k_choice() {
        // SD 1.5's 8x8-level conv at 512x512 (2 x 64 outputs by 1280 channels, k = 11520) on 64x64 tiles: 40
        // workgroups, 720 steps; for 264 workgroups, 7 chunks of 103 steps (the last 102).
        assert_eq!(split_count(None, 264, u64::MAX, 40, 720), 7);
        // Off, already enough workgroups, or k too short for chunks of 8 steps: k whole.
        assert_eq!(split_count(None, 0, u64::MAX, 40, 720), 1);
        assert_eq!(split_count(None, 264, u64::MAX, 264, 720), 1);
        assert_eq!(split_count(None, 264, u64::MAX, 40, 15), 1);
        assert_eq!(split_count(None, 264, u64::MAX, 40, 16), 2);
        // At most 16 chunks, and as many copies of C as one buffer holds.
        assert_eq!(split_count(None, 1 << 20, u64::MAX, 1, 1000), 16);
        assert_eq!(split_count(None, 1 << 20, 3, 1, 1000), 3);
        // Asked for: no empty chunks (9 steps in 4 chunks of 3 is 3 chunks), at most one per step.
        assert_eq!(split_count(Some(4), 0, u64::MAX, 40, 9), 3);
        assert_eq!(split_count(Some(100), 0, u64::MAX, 40, 5), 5);
        assert_eq!(split_count(Some(1), 264, u64::MAX, 40, 720), 1);
        assert_eq!(split_count(Some(3), 0, u64::MAX, 40, 0), 1);
    }
}
