//! The CLIP text encoder as transformers' `CLIPTextModel`: token and position embeddings, pre-norm
//! transformer layers with causal self-attention, and the final layer norm. SD1's ViT-L/14 (quick_gelu) and
//! SD2's OpenCLIP ViT-H tower (gelu, 23 layers kept) differ only in their config.

use serde::Deserialize;

use super::nn::{LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, Tensor};
use crate::ops::{self, Activation, Cols, MatmulOpts};
use crate::weights::{Role, Weights};

/// transformers' `CLIPTextConfig` keys.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_vocab() -> usize {
    49408
}
fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q, k and v stacked into one projection (None when their weights cannot be stacked).
    qkv: Option<Linear>,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The text encoder.
pub struct ClipTextModel {
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    act: Activation,
    dtype: DType,
}

impl ClipTextModel {
    /// Loads `text_model.*` from a transformers checkpoint, or the same names without the `text_model.`
    /// prefix (as transformers 5 saves a `CLIPTextModel`; it loads both).
    pub fn load(w: &Weights, config: ClipConfig) -> Result<Self> {
        let act = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(Error::Invalid(format!("text encoder: hidden_act {other} is not supported"))),
        };
        let (d, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::Invalid(format!("text encoder: {heads} heads do not divide hidden size {d}")));
        }
        let unprefixed = !w.contains("text_model.embeddings.token_embedding.weight")
            && w.contains("embeddings.token_embedding.weight");
        let w = if unprefixed { w.clone() } else { w.pp("text_model") };
        let emb = w.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = w.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                let q = Linear::load(&a.pp("q_proj"), d, d, true)?;
                let k = Linear::load(&a.pp("k_proj"), d, d, true)?;
                let v = Linear::load(&a.pp("v_proj"), d, d, true)?;
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), d, config.layer_norm_eps)?,
                    qkv: Linear::stack(w.ctx(), &[&q, &k, &v])?,
                    q,
                    k,
                    v,
                    out: Linear::load(&a.pp("out_proj"), d, d, true)?,
                    layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), d, config.layer_norm_eps)?,
                    fc1: Linear::load(&l.pp("mlp.fc1"), d, config.intermediate_size, true)?,
                    fc2: Linear::load(&l.pp("mlp.fc2"), config.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: emb.get("token_embedding.weight", &[config.vocab_size, d], Role::Embedding)?,
            position_embedding: emb.get(
                "position_embedding.weight",
                &[config.max_position_embeddings, d],
                Role::Embedding,
            )?,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), d, config.layer_norm_eps)?,
            layers,
            act,
            dtype: w.policy().act,
            config,
        })
    }

    /// The activation dtype the model runs in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Embeddings (batch, tokens, hidden) of token ids (batch, tokens), as the SD pipelines use them
    /// (`last_hidden_state`: after the final layer norm).
    pub fn forward(&self, ctx: &GpuContext, ids: &[Vec<u32>]) -> Result<Tensor> {
        let b = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if b == 0 || l == 0 || l > self.config.max_position_embeddings || ids.iter().any(|r| r.len() != l) {
            return Err(Error::Invalid(format!(
                "text encoder: needs equal-length rows of 1 to {} token ids",
                self.config.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::Invalid(format!("text encoder: token id {bad} is outside the vocabulary")));
        }
        let d = self.config.hidden_size;
        // 1. Token embeddings plus position embeddings.
        let flat: Vec<f32> = ids.iter().flatten().map(|&t| t as f32).collect();
        let tok = ops::embedding(ctx, &self.token_embedding, &Tensor::from_f32(ctx, &[b, l], &flat)?, self.dtype)?;
        let positions: Vec<f32> = (0..l).map(|p| p as f32).collect();
        let pos = ops::embedding(ctx, &self.position_embedding, &Tensor::from_f32(ctx, &[l], &positions)?, self.dtype)?;
        let mut x = ops::add(ctx, &tok, &pos)?;
        // 2. Transformer layers: causal self-attention and MLP, each pre-normed with a residual.
        let heads = self.config.num_attention_heads;
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        //    The norms are computed inside the projections that read them and the residuals added by the
        //    output projections; q, k and v come from one matmul, read in place by the attention kernel.
        for layer in &self.layers {
            fn normed(ln: &LayerNorm) -> MatmulOpts<'_> {
                MatmulOpts { layer_norm: Some(ln.params()), ..Default::default() }
            }
            let o = match &layer.qkv {
                Some(qkv) => {
                    let t = qkv.forward_with(ctx, &x, normed(&layer.layer_norm1))?;
                    let col = |c: usize| Cols { t: &t, col: c * d, width: 3 * d };
                    ops::attention_cols(ctx, col(0), col(1), col(2), heads, d, scale, true)?
                }
                None => {
                    let n = normed(&layer.layer_norm1);
                    let (q, k, v) = (
                        layer.q.forward_with(ctx, &x, n)?,
                        layer.k.forward_with(ctx, &x, n)?,
                        layer.v.forward_with(ctx, &x, n)?,
                    );
                    ops::attention(ctx, &q, &k, &v, heads, scale, true)?
                }
            };
            x = layer.out.forward_with(ctx, &o, MatmulOpts { residual: Some(&x), ..Default::default() })?;
            let mlp = MatmulOpts { act: Some(self.act), ..normed(&layer.layer_norm2) };
            let h = layer.fc1.forward_with(ctx, &x, mlp)?;
            x = layer.fc2.forward_with(ctx, &h, MatmulOpts { residual: Some(&x), ..Default::default() })?;
        }
        // 3. Final layer norm.
        self.final_layer_norm.forward(ctx, &x)
    }
}
