//! Matmul, linear layers and conv2d, all on one tiled GEMM kernel core (`kernels/gemm.wgsl`) with per-op
//! operand loaders. The weight operand (B) may be f32/f16 activations or packed f16, q8_0 or q4_0 weights.

use bytemuck::{Pod, Zeroable};

use super::{Activation, check_act};
use crate::error::{Error, Result, shape_err};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor};

const COMMON: &str = include_str!("../kernels/common.wgsl");
const CORE: &str = include_str!("../kernels/gemm.wgsl");
const B_ACT: &str = include_str!("../kernels/gemm_b_act.wgsl");
const B_F16: &str = include_str!("../kernels/gemm_b_f16.wgsl");
const B_Q8: &str = include_str!("../kernels/gemm_b_q8_0.wgsl");
const B_Q4: &str = include_str!("../kernels/gemm_b_q4_0.wgsl");
const MATMUL: &str = include_str!("../kernels/matmul.wgsl");
const CONV: &str = include_str!("../kernels/conv2d.wgsl");

macro_rules! gemm_kernel {
    ($name:literal, $b:ident, $op:ident) => {
        Kernel { name: $name, sources: &[COMMON, CORE, $b, $op], entry: "", inputs: 3, outputs: 1 }
    };
}

/// Kernels by [op][B operand kind]: the entry point is filled in from the tile.
const KERNELS: [[Kernel; 4]; 2] = [
    [
        gemm_kernel!("matmul_b_act", B_ACT, MATMUL),
        gemm_kernel!("matmul_b_f16", B_F16, MATMUL),
        gemm_kernel!("matmul_b_q8_0", B_Q8, MATMUL),
        gemm_kernel!("matmul_b_q4_0", B_Q4, MATMUL),
    ],
    [
        gemm_kernel!("conv2d_b_act", B_ACT, CONV),
        gemm_kernel!("conv2d_b_f16", B_F16, CONV),
        gemm_kernel!("conv2d_b_q8_0", B_Q8, CONV),
        gemm_kernel!("conv2d_b_q4_0", B_Q4, CONV),
    ],
];

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
}

/// A workgroup tile of the GEMM core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 64x64 outputs per workgroup, 4x4 per invocation, 256 invocations.
    Small,
    /// 128x128 outputs per workgroup, 8x8 per invocation, 256 invocations.
    Large,
}

impl Tile {
    /// The tile for an (m, n) output: large tiles once there are enough of them to fill a big GPU.
    pub fn for_shape(m: usize, n: usize, batch: usize) -> Tile {
        let large_tiles = m.div_ceil(128) * n.div_ceil(128) * batch;
        if m >= 128 && n >= 128 && large_tiles >= 128 { Tile::Large } else { Tile::Small }
    }

    fn dims(self) -> (u32, u32, u32, u32, &'static str) {
        match self {
            Tile::Small => (64, 64, 16, 4, "gemm_4x4"),
            Tile::Large => (128, 128, 16, 8, "gemm_8x8"),
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

fn check_bias(op: &'static str, bias: Option<&Tensor>, n: usize, a: DType) -> Result<()> {
    if let Some(bias) = bias {
        if bias.shape() != [n] {
            return shape_err(op, format!("bias {:?} should be [{n}]", bias.shape()));
        }
        if bias.dtype() != a {
            return Err(Error::DType { op, dtype: bias.dtype(), detail: format!(": bias must be {a}") });
        }
    }
    Ok(())
}

/// Options of [`matmul`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MatmulOpts<'a> {
    /// A is stored (.., k, m).
    pub trans_a: bool,
    /// B is stored (.., n, k), as a linear layer's weight.
    pub trans_b: bool,
    /// Added to every row: shape (n).
    pub bias: Option<&'a Tensor>,
    /// Applied after the bias.
    pub act: Option<Activation>,
    /// Overrides the tile choice (tests use it to cover both tiles).
    pub tile: Option<Tile>,
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

/// Batched matrix product C = A B (+ bias) (activation). A is (.., m, k), B is (.., k, n); either may have no
/// batch dimensions and is then shared by the other's batch.
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
    check_bias(OP, opts.bias, n, a.dtype())?;
    let kind = b_kind(OP, a.dtype(), b, opts.trans_b)?;
    let batch: usize = batch_dims.iter().product();
    let mut out_shape = batch_dims.to_vec();
    out_shape.extend([m, n]);
    if ctx.is_cpu() {
        return super::cpu::matmul(a, b, &opts);
    }
    let out = Tensor::empty(ctx, OP, &out_shape, a.dtype())?;
    let params = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        batch: batch as u32,
        sa: if ba.is_empty() { 0 } else { (m * k) as u32 },
        sb: if bb.is_empty() { 0 } else { (k * n) as u32 },
        sc: (m * n) as u32,
        qoff: (b.dtype().scales_offset(b.numel()) / 4) as u32,
        has_bias: opts.bias.is_some() as u32,
        act: act_code(opts.act),
        ..Default::default()
    };
    let tile = opts.tile.unwrap_or(Tile::for_shape(m, n, batch));
    let spec =
        |spec: Spec| spec.flag("A_TRANS", opts.trans_a).flag("A_K_FAST", !opts.trans_a).flag("B_K_FAST", opts.trans_b);
    launch(ctx, OP, &KERNELS[0][kind], tile, spec, params, [a, b], opts.bias, &out)?;
    Ok(out)
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
    if x.rank() == 0 || weight.rank() != 2 || x.dim(-1) != weight.dim(1) {
        return shape_err(
            "linear",
            format!("input {:?} does not fit weight {:?} (out, in)", x.shape(), weight.shape()),
        );
    }
    let rows = x.numel() / x.dim(-1);
    let x2 = x.reshape(&[rows, x.dim(-1)])?;
    let out = matmul(ctx, &x2, weight, MatmulOpts { trans_b: true, bias, act, ..Default::default() })?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = weight.dim(0);
    out.reshape(&shape)
}

/// Options of [`conv2d`].
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOpts {
    pub stride: usize,
    /// Zero padding before (top, left).
    pub padding: usize,
    /// Zero padding after (bottom, right), when it differs from `padding` (the VAE encoder's downsampler
    /// pads (0, 1, 0, 1)).
    pub padding_end: Option<usize>,
    pub act: Option<Activation>,
    pub tile: Option<Tile>,
}

impl Default for Conv2dOpts {
    fn default() -> Self {
        Self { stride: 1, padding: 0, padding_end: None, act: None, tile: None }
    }
}

/// 2-D convolution, NCHW: x (batch, cin, h, w), weight (cout, cin, kh, kw) or, for quantized weights,
/// (cout, cin * kh * kw) with `kernel` giving (kh, kw); bias (cout).
pub fn conv2d(
    ctx: &GpuContext,
    x: &Tensor,
    weight: &Tensor,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    opts: Conv2dOpts,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    check_act(OP, &[x])?;
    let (kh, kw) = kernel;
    let &[batch, cin, h, w] = x.shape() else {
        return shape_err(OP, format!("input must be (batch, channels, height, width), got {:?}", x.shape()));
    };
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
                "weight {:?} does not fit input {:?} with a {kh}x{kw} kernel, stride {}",
                weight.shape(),
                x.shape(),
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
    check_bias(OP, bias, cout, x.dtype())?;
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
        sa: (cin * h * w) as u32,
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
    };
    let tile = opts.tile.unwrap_or(Tile::for_shape(m, cout, batch));
    let spec =
        |spec: Spec| spec.flag("A_K_FAST", false).flag("B_K_FAST", true).u32("KH", kh as u32).u32("KW", kw as u32);
    launch(ctx, OP, &KERNELS[1][kind], tile, spec, params, [x, weight], bias, &out)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &GpuContext,
    op: &'static str,
    kernel: &Kernel,
    tile: Tile,
    spec: impl FnOnce(Spec) -> Spec,
    params: Params,
    [a, b]: [&Tensor; 2],
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let (bm, bn, bk, tm, entry) = tile.dims();
    let kernel = Kernel { entry, ..*kernel };
    let spec = spec(Spec::new(a.dtype() == DType::F16).u32("BM", bm).u32("BN", bn).u32("BK", bk).u32("TM", tm));
    let dummy;
    let bias = match bias {
        Some(b) => b,
        None => {
            dummy = Tensor::empty(ctx, op, &[1], a.dtype())?;
            &dummy
        }
    };
    let groups = [params.n.div_ceil(bn), params.m.div_ceil(bm), params.batch];
    ctx.dispatch(op, &kernel, &spec, bytemuck::bytes_of(&params), &[a, b, bias], &[out], groups)?;
    ctx.count_flops(op, 2 * params.m as u64 * params.n as u64 * params.k as u64 * params.batch as u64);
    Ok(())
}
