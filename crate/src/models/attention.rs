//! Attention blocks as diffusers' `attention_processor.Attention`, `BasicTransformerBlock` (self-attention,
//! cross-attention, GEGLU feed-forward) and `Transformer2DModel` (the spatial transformer of SD's UNet).
//!
//! Fused as the GEMM core allows: each pre-norm is computed inside the projection that reads it, self-
//! attention's q, k and v are one matmul read in place by the attention kernel, cross-attention's k and v
//! are one matmul over the text embeddings computed once per prompt (cached: they do not change between
//! denoising steps), residuals are added in the output projections' epilogues, GEGLU in the feed-forward
//! projection's, and the projections in and out of the spatial transformer read and write channels-first
//! images directly (no transposes).

use std::sync::Mutex;

use super::nn::{GroupNorm, LayerNorm, Linear};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, Cols, LnParams, MatmulOpts};
use crate::weights::Weights;

/// How the q, k and v projections are applied.
enum Projections {
    /// Self-attention: q, k and v stacked, one matmul.
    SelfStacked(Linear),
    /// Cross-attention: q over the input; k and v stacked over the context.
    CrossStacked { q: Linear, kv: Linear },
    /// Weights that cannot be stacked (mixed dtypes or layouts): three matmuls.
    Separate { q: Linear, k: Linear, v: Linear },
}

/// The context a cross-attention's k and v were last computed for, and them: (batch, tokens, 2 * inner).
type KvCache = Mutex<Option<(Tensor, Tensor)>>;

/// Multi-head attention with q/k/v projections (`to_q`, `to_k`, `to_v`, optionally biased) and `to_out.0`.
pub struct Attention {
    proj: Projections,
    to_out: Linear,
    heads: usize,
    inner: usize,
    scale: f32,
    kv_cache: KvCache,
}

impl Attention {
    /// `query_dim` in and out, keys and values from `context_dim`, `heads` heads of `head_dim`; `cross`:
    /// keys and values come from a context (cross-attention), else from the input.
    pub fn load(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        cross: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let q = Linear::load(&w.pp("to_q"), query_dim, inner, qkv_bias)?;
        let k = Linear::load(&w.pp("to_k"), context_dim, inner, qkv_bias)?;
        let v = Linear::load(&w.pp("to_v"), context_dim, inner, qkv_bias)?;
        let ctx = w.ctx();
        let proj = if cross {
            match Linear::stack(ctx, &[&k, &v])? {
                Some(kv) => Projections::CrossStacked { q, kv },
                None => Projections::Separate { q, k, v },
            }
        } else {
            match Linear::stack(ctx, &[&q, &k, &v])? {
                Some(qkv) => Projections::SelfStacked(qkv),
                None => Projections::Separate { q, k, v },
            }
        };
        Ok(Self {
            proj,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            inner,
            scale: 1.0 / (head_dim as f32).sqrt(),
            kv_cache: Mutex::new(None),
        })
    }

    /// Cross-attention's stacked k and v over `context`, from the cache when `context` is the tensor they
    /// were last computed for.
    fn kv(&self, ctx: &GpuContext, kv: &Linear, context: &Tensor) -> Result<Tensor> {
        let mut cache = self.kv_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, kv)) = cache.as_ref()
            && c.buffer().is_some()
            && c.buffer() == context.buffer()
            && c.shape() == context.shape()
            && c.dtype() == context.dtype()
        {
            return Ok(kv.clone());
        }
        let out = kv.forward(ctx, context)?;
        // The held context keeps its buffer from being reused, so a match above is this very tensor.
        *cache = context.buffer().is_some().then(|| (context.clone(), out.clone()));
        Ok(out)
    }

    /// Drops the cached keys and values (and the context they were made from).
    pub fn release_context(&self) {
        *self.kv_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// x (batch, tokens, query_dim), layer-normalized by `norm` first, attending to `context` (batch,
    /// ctx_tokens, context_dim) or to itself; `residual` is added to the output.
    pub fn forward(
        &self,
        ctx: &GpuContext,
        x: &Tensor,
        norm: &LnParams,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let i = self.inner;
        let normed = MatmulOpts { layer_norm: Some(norm), ..Default::default() };
        let o = match (&self.proj, context) {
            (Projections::SelfStacked(qkv), None) => {
                let t = qkv.forward_with(ctx, x, normed)?;
                let col = |c: usize| Cols { t: &t, col: c * i, width: 3 * i };
                ops::attention_cols(ctx, col(0), col(1), col(2), self.heads, i, self.scale, false)?
            }
            (Projections::CrossStacked { q, kv }, Some(context)) => {
                let q = q.forward_with(ctx, x, normed)?;
                let kv = self.kv(ctx, kv, context)?;
                let col = |c: usize| Cols { t: &kv, col: c * i, width: 2 * i };
                ops::attention_cols(ctx, Cols::all(&q), col(0), col(1), self.heads, i, self.scale, false)?
            }
            (Projections::Separate { q, k, v }, context) => {
                let q = q.forward_with(ctx, x, normed)?;
                let (k, v) = match context {
                    Some(c) => (k.forward(ctx, c)?, v.forward(ctx, c)?),
                    None => (k.forward_with(ctx, x, normed)?, v.forward_with(ctx, x, normed)?),
                };
                ops::attention(ctx, &q, &k, &v, self.heads, self.scale, false)?
            }
            _ => {
                return Err(crate::Error::Invalid(format!(
                    "attention: loaded for {}, called {}",
                    if matches!(self.proj, Projections::SelfStacked(_)) { "self-attention" } else { "cross-attention" },
                    if context.is_some() { "with a context" } else { "without one" }
                )));
            }
        };
        self.to_out.forward_with(ctx, &o, MatmulOpts { residual: Some(residual), ..Default::default() })
    }
}

/// GEGLU feed-forward: `net.0.proj` (dim -> 2 * 4 dim), gelu gate, `net.2` (4 dim -> dim).
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(w: &Weights, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(&w.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::load(&w.pp("net.2"), inner, dim, true)?,
        })
    }

    /// x layer-normalized by `norm`, through the feed-forward, plus `x`.
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, norm: &LnParams) -> Result<Tensor> {
        let h =
            self.proj.forward_with(ctx, x, MatmulOpts { layer_norm: Some(norm), geglu: true, ..Default::default() })?;
        self.out.forward_with(ctx, &h, MatmulOpts { residual: Some(x), ..Default::default() })
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(w: &Weights, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, head_dim, false, false)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, head_dim, false, true)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    pub fn release_context(&self) {
        self.attn2.release_context();
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward(ctx, x, self.norm1.params(), None, x)?;
        let x = self.attn2.forward(ctx, &x, self.norm2.params(), Some(context), &x)?;
        self.ff.forward(ctx, &x, self.norm3.params())
    }
}

/// `Transformer2DModel`: group norm, projection to tokens, transformer blocks, projection back, residual.
pub struct Transformer2D {
    norm: GroupNorm,
    /// `proj_in` / `proj_out`: 1x1 convs (SD1) or linear layers (SD2, use_linear_projection), the same
    /// product over channels either way.
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

/// How a spatial transformer is shaped.
#[derive(Clone, Copy, Debug)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn load(w: &Weights, c: TransformerConfig) -> Result<Self> {
        let head_dim = c.channels / c.heads;
        let proj = |name: &str| -> Result<Linear> {
            if c.linear_projection {
                Linear::load(&w.pp(name), c.channels, c.channels, true)
            } else {
                Linear::load_1x1(&w.pp(name), c.channels, c.channels)
            }
        };
        Ok(Self {
            norm: GroupNorm::load(&w.pp("norm"), c.groups, c.channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..c.layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &w.pp(format!("transformer_blocks.{i}")),
                        c.channels,
                        c.heads,
                        head_dim,
                        c.context_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// Drops the cross-attention keys and values cached for the last context.
    pub fn release_context(&self) {
        self.blocks.iter().for_each(|b| b.release_context());
    }

    /// x (batch, channels, h, w) conditioned on `context` (batch, tokens, context_dim).
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else {
            return crate::error::shape_err(
                "transformer_2d",
                format!("expects (batch, channels, h, w), got {:?}", x.shape()),
            );
        };
        // 1. Norm, then project into tokens (batch, h * w, channels), reading the image channels-first.
        let normed = self.norm.forward(ctx, x, false)?.reshape(&[b, c, h * w])?;
        let proj = &self.proj_in;
        let mut tokens = ops::matmul(
            ctx,
            &normed,
            proj.weight(),
            MatmulOpts { trans_a: true, trans_b: true, bias: proj.bias(), ..Default::default() },
        )?;
        // 2. Transformer blocks.
        for block in &self.blocks {
            tokens = block.forward(ctx, &tokens, context)?;
        }
        // 3. Project back to a channels-first image and add the residual.
        let residual = x.reshape(&[b, c, h * w])?;
        let out = self.proj_out.forward_with(
            ctx,
            &tokens,
            MatmulOpts { trans_c: true, residual: Some(&residual), ..Default::default() },
        )?;
        out.reshape(&[b, c, h, w])
    }
}
