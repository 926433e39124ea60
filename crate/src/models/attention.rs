//! Attention blocks as diffusers' `attention_processor.Attention`, `BasicTransformerBlock` (self-attention,
//! cross-attention, GEGLU feed-forward) and `Transformer2DModel` (the spatial transformer of SD's UNet).

use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops;
use crate::weights::Weights;

/// Multi-head attention with q/k/v projections (`to_q`, `to_k`, `to_v`, optionally biased) and `to_out.0`.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f32,
}

impl Attention {
    /// `query_dim` in and out, keys and values from `context_dim`, `heads` heads of `head_dim`.
    pub fn load(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// x (batch, tokens, query_dim) attending to `context` (batch, ctx_tokens, context_dim), or to itself.
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let kv = context.unwrap_or(x);
        let q = self.to_q.forward(ctx, x)?;
        let k = self.to_k.forward(ctx, kv)?;
        let v = self.to_v.forward(ctx, kv)?;
        let o = ops::attention(ctx, &q, &k, &v, self.heads, self.scale, false)?;
        self.to_out.forward(ctx, &o)
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

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        let h = ops::geglu(ctx, &self.proj.forward(ctx, x)?)?;
        self.out.forward(ctx, &h)
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
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = ops::add(ctx, &self.attn1.forward(ctx, &self.norm1.forward(ctx, x)?, None)?, x)?;
        let x = ops::add(ctx, &self.attn2.forward(ctx, &self.norm2.forward(ctx, &x)?, Some(context))?, &x)?;
        ops::add(ctx, &self.ff.forward(ctx, &self.norm3.forward(ctx, &x)?)?, &x)
    }
}

/// The projection in and out of a spatial transformer: 1x1 conv (SD1) or linear (SD2, use_linear_projection).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, projection to tokens, transformer blocks, projection back, residual.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
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
        let proj = |name: &str| -> Result<Projection> {
            Ok(if c.linear_projection {
                Projection::Linear(Linear::load(&w.pp(name), c.channels, c.channels, true)?)
            } else {
                Projection::Conv(Conv2d::load(&w.pp(name), c.channels, c.channels, 1, 1, 0, true)?)
            })
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

    /// x (batch, channels, h, w) conditioned on `context` (batch, tokens, context_dim).
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let &[_, _, h, w] = x.shape() else {
            return crate::error::shape_err(
                "transformer_2d",
                format!("expects (batch, channels, h, w), got {:?}", x.shape()),
            );
        };
        // 1. Norm and project into tokens (batch, h * w, channels).
        let normed = self.norm.forward(ctx, x, false)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => ops::nchw_to_tokens(ctx, &conv.forward(ctx, &normed)?)?,
            Projection::Linear(lin) => lin.forward(ctx, &ops::nchw_to_tokens(ctx, &normed)?)?,
        };
        // 2. Transformer blocks.
        for block in &self.blocks {
            tokens = block.forward(ctx, &tokens, context)?;
        }
        // 3. Project back to an image and add the residual.
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(ctx, &ops::tokens_to_nchw(ctx, &tokens, h, w)?)?,
            Projection::Linear(lin) => ops::tokens_to_nchw(ctx, &lin.forward(ctx, &tokens)?, h, w)?,
        };
        ops::add(ctx, &out, x)
    }
}
