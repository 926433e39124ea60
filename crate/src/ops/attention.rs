//! Fused multi-head scaled-dot-product attention (flash-attention style, see `kernels/attention.wgsl`; on
//! cooperative matrices for f16 where the device has them, `kernels/attention_coop.wgsl`).

use bytemuck::{Pod, Zeroable};

use super::{act_dtype, check_act};
use crate::error::{Result, shape_err};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor};

const ATTENTION_COMMON: &str = include_str!("../kernels/attention_common.wgsl");

const ATTENTION: Kernel = Kernel {
    name: "attention",
    sources: &[ATTENTION_COMMON, include_str!("../kernels/attention.wgsl")],
    entry: "main",
    inputs: 3,
    outputs: 1,
};

const ATTENTION_COOP: Kernel = Kernel {
    name: "attention_coop",
    sources: &[ATTENTION_COMMON, include_str!("../kernels/attention_coop.wgsl")],
    entry: "main",
    inputs: 3,
    outputs: 1,
};

/// The cooperative matrix kernel's (subgroups, keys per block) for head dim `d` on fragments of `s`, the
/// first (most queries and keys per workgroup) whose workgroup memory fits `limit` bytes.
fn coop_blocks(d: usize, s: usize, limit: usize) -> Option<(usize, usize)> {
    let dp = d.div_ceil(s) * s;
    [(4, 64), (4, 32), (2, 64), (2, 32), (2, 16), (1, 32), (1, 16)].into_iter().find(|&(nsg, bc)| {
        let bc = bc.max(s);
        let qb = nsg * s;
        // Qs, Ks, Vs, Ps in f16; Ss, Os and three row vectors in f32.
        let bytes = 2 * (qb * dp + 2 * bc * dp + qb * bc) + 4 * (qb * bc + qb * dp + 3 * qb);
        bytes <= limit
    })
}

/// Head dims above this take the unfused path (the fused kernel keeps a query row and its output in
/// registers).
const MAX_FUSED_HEAD_DIM: usize = 256;

/// softmax(Q K^T * scale) V through a materialized score matrix: the VAE's single-head attention over
/// 512 channels. One head only; the scores must fit one buffer binding.
fn unfused(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    if heads != 1 || causal {
        return shape_err(
            OP,
            format!(
                "head dim {} above {MAX_FUSED_HEAD_DIM} needs one head and no mask ({:?}, {heads} heads)",
                q.dim(-1) / heads,
                q.shape()
            ),
        );
    }
    let scores = super::matmul(ctx, q, k, super::MatmulOpts { trans_b: true, ..Default::default() })?;
    let probs = super::norm::softmax_scaled(ctx, &scores, scale)?;
    drop(scores);
    super::matmul(ctx, &probs, v, super::MatmulOpts::default())
}

/// Invocations per workgroup of the portable kernel (each with `Tuning::attention_queries` queries).
const WG: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    lq: u32,
    lk: u32,
    heads: u32,
    scale: f32,
    sq: u32,
    sk: u32,
    sv: u32,
    so: u32,
    bq: u32,
    bk: u32,
    bv: u32,
    bo: u32,
    qo: u32,
    ko: u32,
    vo: u32,
    _pad: u32,
}

/// An attention operand: columns `col .. col + heads * d` of a (batch, tokens, width) tensor, so that q, k
/// and v are read in place from one fused projection's output.
#[derive(Clone, Copy, Debug)]
pub struct Cols<'a> {
    pub t: &'a Tensor,
    pub col: usize,
    pub width: usize,
}

impl<'a> Cols<'a> {
    /// The whole tensor.
    pub fn all(t: &'a Tensor) -> Self {
        Self { t, col: 0, width: t.shape().last().copied().unwrap_or(0) }
    }
}

/// softmax(Q K^T * scale) V over `heads` heads. q is (batch, lq, heads * d), k and v (batch, lk, heads * d),
/// as the projections produce them (no permute needed); the result is (batch, lq, heads * d). With `causal`,
/// query i attends to keys 0..=i (CLIP's text encoder).
pub fn attention(
    ctx: &GpuContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let hd = q.shape().last().copied().unwrap_or(0);
    attention_cols(ctx, Cols::all(q), Cols::all(k), Cols::all(v), heads, hd, scale, causal)
}

/// [`attention`] over `heads * d = hd` columns of each operand (see [`Cols`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_cols(
    ctx: &GpuContext,
    q: Cols<'_>,
    k: Cols<'_>,
    v: Cols<'_>,
    heads: usize,
    hd: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    check_act(OP, &[q.t, k.t, v.t])?;
    let (&[b, lq, wq], &[bk, lk, wk], &[bv, lv, wv]) = (q.t.shape(), k.t.shape(), v.t.shape()) else {
        return shape_err(
            OP,
            format!(
                "q, k, v must be (batch, tokens, heads * dim), got {:?} {:?} {:?}",
                q.t.shape(),
                k.t.shape(),
                v.t.shape()
            ),
        );
    };
    let inside = |c: &Cols<'_>, w: usize| c.width == w && c.col + hd <= w;
    if b != bk
        || b != bv
        || lk != lv
        || !inside(&q, wq)
        || !inside(&k, wk)
        || !inside(&v, wv)
        || heads == 0
        || !hd.is_multiple_of(heads)
        || lk == 0
    {
        return shape_err(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?} (columns {}, {}, {} of {hd}) do not fit {heads} heads",
                q.t.shape(),
                k.t.shape(),
                v.t.shape(),
                q.col,
                k.col,
                v.col
            ),
        );
    }
    let d = hd / heads;
    let whole = |c: &Cols<'_>| c.col == 0 && c.width == hd;
    if ctx.is_cpu() {
        return super::cpu::attention_heads((&q, &k, &v), heads, hd, scale, causal);
    }
    if d > MAX_FUSED_HEAD_DIM {
        if !(whole(&q) && whole(&k) && whole(&v)) {
            return shape_err(OP, format!("head dim {d} above {MAX_FUSED_HEAD_DIM} needs whole q, k and v"));
        }
        return unfused(ctx, q.t, k.t, v.t, heads, scale, causal);
    }
    let out = Tensor::empty(ctx, OP, &[b, lq, hd], q.t.dtype())?;
    let params = Params {
        lq: lq as u32,
        lk: lk as u32,
        heads: heads as u32,
        scale,
        sq: wq as u32,
        sk: wk as u32,
        sv: wv as u32,
        so: hd as u32,
        bq: (lq * wq) as u32,
        bk: (lk * wk) as u32,
        bv: (lk * wv) as u32,
        bo: (lq * hd) as u32,
        qo: q.col as u32,
        ko: k.col as u32,
        vo: v.col as u32,
        _pad: 0,
    };
    let limit = ctx.summary().max_compute_workgroup_storage_size as usize;
    let coop = ctx.coop().filter(|_| q.t.dtype() == DType::F16);
    let (kernel, spec, queries) = match coop.and_then(|c| Some((c, coop_blocks(d, c.size as usize, limit)?))) {
        Some((c, (nsg, bc))) => {
            let s = c.size as usize;
            let spec = c
                .spec()
                .u32("D", d as u32)
                .u32("DP", d.div_ceil(s) as u32 * c.size)
                .u32("NSG", nsg as u32)
                .u32("BC", bc.max(s) as u32)
                .flag("CAUSAL", causal);
            (&ATTENTION_COOP, spec, nsg * s)
        }
        None => {
            let dv = d.div_ceil(4);
            // K and V tiles of bkv keys each must fit the workgroup memory.
            let fit = limit / (2 * dv * 16);
            let bkv = (1usize << fit.max(1).ilog2()).clamp(1, 32);
            // One query per invocation scores a whole tile at once; two score 8 keys at a time, so that both
            // queries' scores stay in registers beside their rows and outputs.
            let qpi = ctx.summary().tuning.attention_queries as usize;
            let ch = if qpi == 1 { bkv } else { bkv.min(8) };
            let spec = Spec::new(act_dtype(q.t)?)
                .u32("D", d as u32)
                .u32("DV", dv as u32)
                .u32("BKV", bkv as u32)
                .u32("QPI", qpi as u32)
                .u32("CH", ch as u32)
                .flag("CAUSAL", causal);
            (&ATTENTION, spec, WG * qpi)
        }
    };
    let groups = [lq.div_ceil(queries) as u32, heads as u32, b as u32];
    ctx.dispatch(OP, kernel, &spec, bytemuck::bytes_of(&params), &[q.t, k.t, v.t], &[&out], groups)?;
    ctx.count_flops(OP, 4 * (b * heads * lq * lk * d) as u64);
    Ok(out)
}
