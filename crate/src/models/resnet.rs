//! `ResnetBlock2D` (diffusers' `resnet.py`): two norm-SiLU-conv stages, the time embedding added between
//! them, and a 1x1 shortcut when the channel count changes.
//!
//! Fused as the GEMM core allows: the time embedding's projection (with conv1's bias folded in) is conv1's
//! per-sample bias row, the shortcut (or the input) is conv2's residual, and in the UNet's up path the
//! concatenation of features and skip connection is read in place by norm1 and the shortcut.

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, Conv2dOpts};
use crate::weights::Weights;

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// `time_emb_proj`, its bias plus conv1's: the per-sample bias of conv1. Taken by the UNet, which
    /// computes every block's projection in one matmul.
    time_emb_proj: Option<Linear>,
    /// Where this block's row starts in [`TimeRows::Stacked`].
    time_offset: usize,
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

/// Every ResNet block's time-embedding projection (conv1's bias included) for one UNet evaluation.
pub enum TimeRows {
    /// All blocks' projections from one matmul: (batch, stride), block rows at their `time_offset`.
    Stacked { all: Tensor, stride: usize },
    /// SiLU(time embedding) (batch, temb_channels), each block projecting it itself (weights that could
    /// not be stacked).
    PerBlock { temb: Tensor },
}

impl TimeRows {
    /// `block`'s row: (tensor, offset, batch stride).
    fn row(&self, ctx: &GpuContext, block: &ResnetBlock2D) -> Result<(Tensor, usize, usize)> {
        let proj = block
            .time_emb_proj
            .as_ref()
            .ok_or_else(|| crate::Error::Invalid("resnet: a time embedding for a block without one".into()))?;
        Ok(match self {
            TimeRows::Stacked { all, stride } => (all.clone(), block.time_offset, *stride),
            TimeRows::PerBlock { temb } => (proj.forward(ctx, temb)?, 0, block.out_channels),
        })
    }
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, c: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (c.in_channels, c.out_channels);
        let mut conv1 = Conv2d::load(&w.pp("conv1"), cin, cout, 3, 1, 1, true)?;
        let time_emb_proj = match c.temb_channels {
            Some(t) => {
                let proj = Linear::load(&w.pp("time_emb_proj"), t, cout, true)?;
                let bias = match (proj.bias(), conv1.take_bias()) {
                    (Some(a), Some(b)) => Some(ops::add(w.ctx(), a, &b)?),
                    (a, b) => a.cloned().or(b),
                };
                Some(Linear::new(proj.weight().clone(), bias))
            }
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), c.groups, cin, c.eps)?,
            conv1,
            time_emb_proj,
            time_offset: 0,
            norm2: GroupNorm::load(&w.pp("norm2"), c.groups, cout, c.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut: (cin != cout)
                .then(|| Conv2d::load(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0, true))
                .transpose()?,
            out_channels: cout,
            output_scale: c.output_scale_factor as f32,
        })
    }

    /// The time projection (weight (out_channels, temb), bias including conv1's), for the UNet to stack with
    /// the other blocks'.
    pub fn time_projection(&self) -> Option<&Linear> {
        self.time_emb_proj.as_ref()
    }

    /// Sets where this block's row starts in [`TimeRows::Stacked`].
    pub fn set_time_offset(&mut self, offset: usize) {
        self.time_offset = offset;
    }

    /// x (batch, cin, h, w); blocks with a time embedding need `temb`.
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, temb: Option<&TimeRows>) -> Result<Tensor> {
        self.forward_cat(ctx, x.clone(), None, temb)
    }

    /// The block over concat(x, skip) on channels (the UNet's up path), the concatenation read in place.
    /// Taking x lets the block drop it once read (when the caller holds no other reference), so its buffer
    /// serves the block's output: at the VAE's last stage x is a 128 MiB image.
    pub fn forward_cat(
        &self,
        ctx: &GpuContext,
        x: Tensor,
        skip: Option<&Tensor>,
        temb: Option<&TimeRows>,
    ) -> Result<Tensor> {
        let row = match (&self.time_emb_proj, temb) {
            (Some(_), Some(t)) => Some(t.row(ctx, self)?),
            (Some(_), None) => return Err(crate::Error::Invalid("resnet: this block needs a time embedding".into())),
            (None, _) => None,
        };
        // Each norm is applied by the conv that reads it, as it loads its input, so no normalized image is
        // ever made (at 512x512 the VAE's would be 64-128 MiB each).
        // 1. Norm, SiLU, conv1 with the time embedding as its per-sample bias.
        let bias = row.as_ref().map(|(t, off, stride)| (t, *off, *stride));
        let h = self.norm1.conv(ctx, &self.conv1, &x, true, bias, Conv2dOpts { concat: skip, ..Default::default() })?;
        // 2. The shortcut (a 1x1 conv when the width changes, else the input), added by conv2.
        let shortcut = match (&self.conv_shortcut, skip) {
            (Some(conv), _) => conv.forward_with(ctx, &x, None, Conv2dOpts { concat: skip, ..Default::default() })?,
            (None, Some(skip)) => ops::concat(ctx, &x, skip, 1)?,
            (None, None) => x.clone(),
        };
        drop(x);
        // 3. Norm, SiLU, conv2 plus the shortcut.
        let residual = Conv2dOpts { residual: Some(&shortcut), ..Default::default() };
        let out = self.norm2.conv(ctx, &self.conv2, &h, true, None, residual)?;
        drop((h, shortcut));
        if self.output_scale == 1.0 { Ok(out) } else { ops::affine(ctx, &out, 1.0 / self.output_scale, 0.0) }
    }
}
