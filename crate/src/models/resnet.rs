//! `ResnetBlock2D` (diffusers' `resnet.py`): two norm-SiLU-conv stages, the time embedding added between
//! them, and a 1x1 shortcut when the channel count changes.

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops;
use crate::weights::Weights;

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    out_channels: usize,
    output_scale: f32,
}

/// How a ResNet block is shaped.
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, when the block takes one (the UNet's; the VAE's blocks take none).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, c: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (c.in_channels, c.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), c.groups, cin, c.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), cin, cout, 3, 1, 1, true)?,
            time_emb_proj: c.temb_channels.map(|t| Linear::load(&w.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: GroupNorm::load(&w.pp("norm2"), c.groups, cout, c.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut: (cin != cout)
                .then(|| Conv2d::load(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0, true))
                .transpose()?,
            out_channels: cout,
            output_scale: c.output_scale_factor as f32,
        })
    }

    /// x (batch, cin, h, w); `temb` is SiLU(time embedding) (batch, temb_channels), shared by all blocks.
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(ctx, &self.norm1.forward(ctx, x, true)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(ctx, temb)?;
            h = ops::add(ctx, &h, &t.reshape(&[t.dim(0), self.out_channels, 1, 1])?)?;
        }
        let h = self.conv2.forward(ctx, &self.norm2.forward(ctx, &h, true)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(ctx, x)?,
            None => x.clone(),
        };
        let out = ops::add(ctx, &shortcut, &h)?;
        if self.output_scale == 1.0 { Ok(out) } else { ops::affine(ctx, &out, 1.0 / self.output_scale, 0.0) }
    }
}
