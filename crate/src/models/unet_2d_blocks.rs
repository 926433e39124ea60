//! The UNet's down, mid and up blocks (diffusers' `unet_2d_blocks.py`): `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`, with their samplers.

use super::attention::{Transformer2D, TransformerConfig};
use super::nn::Conv2d;
use super::resnet::{ResnetBlock2D, ResnetConfig, TimeRows};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops::Conv2dOpts;
use crate::weights::Weights;

/// What every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockShape {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
}

impl BlockShape {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, layers: usize) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads,
            context_dim: self.context_dim,
            layers,
            groups: self.groups,
            linear_projection: self.linear_projection,
        }
    }
}

/// A down block: resnets (each followed by a transformer in cross-attention blocks), then a stride-2 conv.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

/// Attention in a block: heads and transformer layers, or none (DownBlock2D / UpBlock2D).
#[derive(Clone, Copy, Debug)]
pub struct CrossAttn {
    pub heads: usize,
    pub layers: usize,
}

impl DownBlock {
    pub fn release_context(&self) {
        self.attentions.iter().for_each(|a| a.release_context());
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.resnets.iter_mut()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        s: &BlockShape,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attn: Option<CrossAttn>,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(&w.pp(format!("resnets.{i}")), s.resnet(cin, out_channels))?);
            if let Some(a) = attn {
                attentions.push(Transformer2D::load(
                    &w.pp(format!("attentions.{i}")),
                    s.transformer(out_channels, a.heads, a.layers),
                )?);
            }
        }
        let downsampler = add_downsample
            .then(|| {
                Conv2d::load(&w.pp("downsamplers.0.conv"), out_channels, out_channels, 3, 2, downsample_padding, true)
            })
            .transpose()?;
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the block's output and the states it hands to the up path (one per resnet, plus the
    /// downsampled one).
    pub fn forward(
        &self,
        ctx: &GpuContext,
        x: &Tensor,
        temb: &TimeRows,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(ctx, &x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(ctx, &x, context)?;
            }
            states.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(ctx, &x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
pub struct MidBlock {
    first: ResnetBlock2D,
    rest: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn release_context(&self) {
        self.rest.iter().for_each(|(a, _)| a.release_context());
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        std::iter::once(&mut self.first).chain(self.rest.iter_mut().map(|(_, r)| r))
    }

    pub fn load(w: &Weights, s: &BlockShape, channels: usize, attn: CrossAttn) -> Result<Self> {
        Ok(Self {
            first: ResnetBlock2D::load(&w.pp("resnets.0"), s.resnet(channels, channels))?,
            rest: vec![(
                Transformer2D::load(&w.pp("attentions.0"), s.transformer(channels, attn.heads, attn.layers))?,
                ResnetBlock2D::load(&w.pp("resnets.1"), s.resnet(channels, channels))?,
            )],
        })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, temb: &TimeRows, context: &Tensor) -> Result<Tensor> {
        let mut x = self.first.forward(ctx, x, Some(temb))?;
        for (attn, resnet) in &self.rest {
            x = resnet.forward(ctx, &attn.forward(ctx, &x, context)?, Some(temb))?;
        }
        Ok(x)
    }
}

/// An up block: resnets over (x concatenated with a skip state), transformers in cross-attention blocks,
/// then nearest 2x upsampling and a conv.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    pub fn release_context(&self) {
        self.attentions.iter().for_each(|a| a.release_context());
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.resnets.iter_mut()
    }

    /// `skip_channels[i]` is the width of the skip state the i-th resnet consumes.
    pub fn load(
        w: &Weights,
        s: &BlockShape,
        prev_channels: usize,
        out_channels: usize,
        skip_channels: &[usize],
        attn: Option<CrossAttn>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for (i, &skip) in skip_channels.iter().enumerate() {
            let cin = if i == 0 { prev_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(&w.pp(format!("resnets.{i}")), s.resnet(cin + skip, out_channels))?);
            if let Some(a) = attn {
                attentions.push(Transformer2D::load(
                    &w.pp(format!("attentions.{i}")),
                    s.transformer(out_channels, a.heads, a.layers),
                )?);
            }
        }
        let upsampler = add_upsample
            .then(|| Conv2d::load(&w.pp("upsamplers.0.conv"), out_channels, out_channels, 3, 1, 1, true))
            .transpose()?;
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Consumes skip states from the end of `states`.
    pub fn forward(
        &self,
        ctx: &GpuContext,
        x: &Tensor,
        states: &mut Vec<Tensor>,
        temb: &TimeRows,
        context: &Tensor,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = states.pop().ok_or_else(|| crate::Error::Invalid("unet: ran out of skip connections".into()))?;
            x = resnet.forward_cat(ctx, x, Some(&skip), Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(ctx, &x, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            x = up.forward_with(ctx, &x, None, Conv2dOpts { upsample: true, ..Default::default() })?;
        }
        Ok(x)
    }
}
