//! `UNet2DConditionModel` (diffusers' `unet_2d_condition.py`): any depth and width its config describes,
//! SD1 (conv projections, one head count) and SD2 (linear projections, heads per block) alike, with LCM's
//! guidance embedding (`time_cond_proj_dim`).

use serde::Deserialize;

use super::PerBlock;
use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::TimeRows;
use super::unet_2d_blocks::{BlockShape, CrossAttn, DownBlock, MidBlock, UpBlock};
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, Tensor};
use crate::ops::{self, Activation, MatmulOpts, TimestepEmbedding};
use crate::weights::Weights;

/// The keys of diffusers' UNet config that matter here; unsupported variants are refused by name.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_conv_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_conv_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
}

fn default_channels() -> usize {
    4
}
fn default_sample_size() -> usize {
    64
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_layers() -> PerBlock {
    PerBlock::One(2)
}
fn default_heads() -> PerBlock {
    PerBlock::One(8)
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_one_usize() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_conv_kernel() -> usize {
    3
}
fn default_shift() -> String {
    "default".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_scale() -> f64 {
    1.0
}

impl UNetConfig {
    /// Refuses configs this implementation would silently get wrong.
    fn check(&self) -> Result<()> {
        let unsupported = |what: &str| Err(Error::Invalid(format!("unet config: {what} is not supported")));
        if self.class_embed_type.is_some() || self.addition_embed_type.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported("class/addition embeddings (SDXL-style conditioning)");
        }
        if self.time_embedding_dim.is_some() || self.time_embedding_act_fn.is_some() || self.timestep_post_act.is_some()
        {
            return unsupported("a custom time embedding");
        }
        if self.dual_cross_attention || self.only_cross_attention.as_bool().unwrap_or(false) {
            return unsupported("dual or cross-only attention");
        }
        if self.resnet_time_scale_shift != "default"
            || self.act_fn != "silu"
            || self.time_embedding_type != "positional"
        {
            return unsupported("resnet_time_scale_shift, act_fn or time_embedding_type other than the defaults");
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") || self.mid_block_scale_factor != 1.0 {
            return unsupported(&format!("mid block {:?}", self.mid_block_type));
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid(format!(
                "unet config: {n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        Ok(())
    }

    /// Total downsampling of the UNet (2 per down block but the last).
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Elements of the largest activation a UNet evaluation at batch `batch` on an (h, w) latent makes: a
    /// level's feature map, the skip concatenation of the up path, or the GEGLU projection (8 x channels per
    /// token) of its transformer blocks. What must fit one buffer binding.
    pub fn largest_activation(&self, batch: usize, h: usize, w: usize) -> usize {
        let c = &self.block_out_channels;
        let mut max = 0;
        for (l, &ch) in c.iter().enumerate() {
            let hw = h.div_ceil(1 << l) * w.div_ceil(1 << l);
            let next = c[(l + 1).min(c.len() - 1)];
            let attention = self.down_block_types.get(l).is_some_and(|t| t.contains("CrossAttn"));
            max = max.max(batch * hw * (ch + next)).max(if attention { batch * hw * 8 * ch } else { 0 });
        }
        max
    }

    fn attn(kind: &str, heads: usize, layers: usize) -> Result<Option<CrossAttn>> {
        match kind {
            "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(Some(CrossAttn { heads, layers })),
            "DownBlock2D" | "UpBlock2D" => Ok(None),
            other => Err(Error::Invalid(format!("unet config: block type {other} is not supported"))),
        }
    }
}

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear; LCM adds `cond_proj(condition)` to the input.
struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
}

/// The UNet.
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    time_embedding: TimeEmbedding,
    /// Every ResNet block's time projection (conv1's bias included) stacked into one layer, and its width;
    /// None when their weights cannot be stacked (each block then projects for itself).
    time_projections: Option<(Linear, usize)>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn load(w: &Weights, config: UNetConfig) -> Result<Self> {
        config.check()?;
        let c = &config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let heads = c.num_attention_heads.as_ref().unwrap_or(&c.attention_head_dim).expand(n, "attention heads")?;
        let tlayers = c.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        let context_dims = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        if context_dims.iter().any(|d| *d != context_dims[0]) {
            return Err(Error::Invalid("unet config: per-block cross_attention_dim is not supported".into()));
        }
        let temb = ch[0] * 4;
        let shape = BlockShape {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: context_dims[0],
            linear_projection: c.use_linear_projection,
        };
        // 1. Time embedding and input conv.
        let te = w.pp("time_embedding");
        let time_embedding = TimeEmbedding {
            linear_1: Linear::load(&te.pp("linear_1"), ch[0], temb, true)?,
            linear_2: Linear::load(&te.pp("linear_2"), temb, temb, true)?,
            cond_proj: c.time_cond_proj_dim.map(|d| Linear::load(&te.pp("cond_proj"), d, ch[0], false)).transpose()?,
        };
        let conv_in =
            Conv2d::load(&w.pp("conv_in"), c.in_channels, ch[0], c.conv_in_kernel, 1, c.conv_in_kernel / 2, true)?;
        // 2. Down blocks.
        let mut down = Vec::new();
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let attn = UNetConfig::attn(&c.down_block_types[i], heads[i], tlayers[i])?;
            let wb = w.pp(format!("down_blocks.{i}"));
            down.push(DownBlock::load(&wb, &shape, cin, ch[i], layers[i], attn, i + 1 < n, c.downsample_padding)?);
        }
        // 3. Mid block.
        let mid_attn = CrossAttn { heads: heads[n - 1], layers: tlayers[n - 1] };
        let mid = MidBlock::load(&w.pp("mid_block"), &shape, ch[n - 1], mid_attn)?;
        // 4. Up blocks, widths as diffusers computes them.
        let mut up = Vec::new();
        let mut out_channel = ch[n - 1];
        for i in 0..n {
            let r = n - 1 - i;
            let prev = out_channel;
            out_channel = ch[r];
            let input_channel = ch[r.saturating_sub(1)];
            let count = layers[r] + 1;
            let skips: Vec<usize> =
                (0..count).map(|j| if j + 1 == count { input_channel } else { out_channel }).collect();
            let attn = UNetConfig::attn(&c.up_block_types[i], heads[r], tlayers[r])?;
            up.push(UpBlock::load(
                &w.pp(format!("up_blocks.{i}")),
                &shape,
                prev,
                out_channel,
                &skips,
                attn,
                i + 1 < n,
            )?);
        }
        // 5. Output.
        let conv_norm_out = GroupNorm::load(&w.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?;
        let conv_out =
            Conv2d::load(&w.pp("conv_out"), ch[0], c.out_channels, c.conv_out_kernel, 1, c.conv_out_kernel / 2, true)?;
        let mut unet =
            Self { config, time_embedding, time_projections: None, conv_in, down, mid, up, conv_norm_out, conv_out };
        unet.stack_time_projections(w.ctx())?;
        Ok(unet)
    }

    /// Stacks the ResNet blocks' time projections into one layer (one matmul per step instead of one per
    /// block) and tells each block where its row starts.
    fn stack_time_projections(&mut self, ctx: &GpuContext) -> Result<()> {
        let mut blocks: Vec<&mut super::resnet::ResnetBlock2D> = Vec::new();
        blocks.extend(self.down.iter_mut().flat_map(|b| b.resnets_mut()));
        blocks.extend(self.mid.resnets_mut());
        blocks.extend(self.up.iter_mut().flat_map(|b| b.resnets_mut()));
        let projections: Vec<&Linear> = blocks.iter().filter_map(|b| b.time_projection()).collect();
        if projections.len() != blocks.len() {
            return Ok(());
        }
        let Some(stacked) = Linear::stack(ctx, &projections)? else { return Ok(()) };
        let widths: Vec<usize> = projections.iter().map(|p| p.weight().dim(0)).collect();
        let mut offset = 0;
        for (block, width) in blocks.into_iter().zip(widths) {
            block.set_time_offset(offset);
            offset += width;
        }
        self.time_projections = Some((stacked, offset));
        Ok(())
    }

    /// Drops the cross-attention keys and values cached for the last context (`forward` computes them once
    /// per context tensor): a generation calls this when it ends, so that they do not outlive it.
    pub fn release_context(&self) {
        self.down.iter().for_each(|b| b.release_context());
        self.mid.release_context();
        self.up.iter().for_each(|b| b.release_context());
    }

    /// The noise (or v) prediction for `sample` (batch, in_channels, h, w) at `timestep`, conditioned on
    /// `context` (batch, tokens, cross_attention_dim) and, for LCM, `timestep_cond` (batch, time_cond_proj_dim).
    pub fn forward(
        &self,
        ctx: &GpuContext,
        sample: &Tensor,
        timestep: f32,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let &[b, _, h, w] = sample.shape() else {
            return crate::error::shape_err(
                "unet",
                format!("sample must be (batch, channels, h, w), got {:?}", sample.shape()),
            );
        };
        let down = self.config.downsampling();
        if !h.is_multiple_of(down) || !w.is_multiple_of(down) {
            return crate::error::shape_err(
                "unet",
                format!("latent {h}x{w} is not a multiple of the UNet's downsampling {down}"),
            );
        }
        let act = sample.dtype();
        // 1. Time embedding: sinusoidal (on the host), (+ guidance condition), linear-SiLU-linear-SiLU, then
        //    every ResNet block's projection of it.
        let emb_cfg = TimestepEmbedding {
            dim: self.config.block_out_channels[0],
            flip_sin_to_cos: self.config.flip_sin_to_cos,
            downscale_freq_shift: self.config.freq_shift as f32,
            max_period: 10000.0,
            scale: 1.0,
        };
        if emb_cfg.dim < 2 || (emb_cfg.dim / 2) as f32 == emb_cfg.downscale_freq_shift {
            return Err(Error::Invalid(format!("unet: cannot embed timesteps in {} dimensions", emb_cfg.dim)));
        }
        let mut t_emb = Tensor::from_f32_as(ctx, &[b, emb_cfg.dim], &emb_cfg.values(&vec![timestep; b]), act)?;
        let te = &self.time_embedding;
        match (&te.cond_proj, timestep_cond) {
            (Some(proj), Some(cond)) => {
                t_emb = proj.forward_with(ctx, cond, MatmulOpts { residual: Some(&t_emb), ..Default::default() })?
            }
            (Some(_), None) => {
                return Err(Error::Invalid("unet: this UNet needs a timestep_cond (LCM guidance embedding)".into()));
            }
            (None, Some(_)) => {
                return Err(Error::Invalid("unet: timestep_cond given to a UNet without time_cond_proj_dim".into()));
            }
            (None, None) => {}
        }
        let emb = te.linear_1.forward_act(ctx, &t_emb, Activation::Silu)?;
        let temb = te.linear_2.forward_act(ctx, &emb, Activation::Silu)?;
        let temb = match &self.time_projections {
            Some((stacked, stride)) => TimeRows::Stacked { all: stacked.forward(ctx, &temb)?, stride: *stride },
            None => TimeRows::PerBlock { temb },
        };
        // 2. Down path, keeping the skip states.
        let mut x = self.conv_in.forward(ctx, sample)?;
        let mut states = vec![x.clone()];
        for block in &self.down {
            let (out, s) = block.forward(ctx, &x, &temb, context)?;
            x = out;
            states.extend(s);
        }
        // 3. Mid block.
        x = self.mid.forward(ctx, &x, &temb, context)?;
        // 4. Up path.
        for block in &self.up {
            x = block.forward(ctx, &x, &mut states, &temb, context)?;
        }
        // 5. Norm, SiLU, conv out.
        self.conv_norm_out.conv(ctx, &self.conv_out, &x, true, None, Default::default())
    }
}

/// diffusers' `get_guidance_scale_embedding` for LCM: w = guidance - 1, scaled by 1000, embedded in `dim`.
pub fn guidance_embedding(ctx: &GpuContext, guidance: f32, batch: usize, dim: usize, act: DType) -> Result<Tensor> {
    let w = Tensor::from_f32(ctx, &[batch], &vec![(guidance - 1.0) * 1000.0; batch])?;
    let cfg =
        TimestepEmbedding { dim, flip_sin_to_cos: false, downscale_freq_shift: 1.0, max_period: 10000.0, scale: 1.0 };
    ops::timestep_embedding(ctx, &w, cfg, act)
}
