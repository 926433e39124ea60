//! The layers models are built from (linear, conv, norms), each loading its weights by the reference
//! implementation's names (`weight`, `bias`) and calling ops.

use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, Activation, Conv2dOpts};
use crate::weights::{Role, Weights};

/// `nn.Linear`: weight (out, in), optional bias (out).
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[out_dim, in_dim], Role::Linear)?,
            bias: if bias { Some(w.get("bias", &[out_dim], Role::Param)?) } else { None },
        })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        ops::linear(ctx, x, &self.weight, self.bias.as_ref())
    }

    /// The layer with an activation fused after the bias.
    pub fn forward_act(&self, ctx: &GpuContext, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::linear_act(ctx, x, &self.weight, self.bias.as_ref(), Some(act))
    }
}

/// `nn.Conv2d` with a square kernel.
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel: usize,
    opts: Conv2dOpts<'static>,
}

impl Conv2d {
    pub fn load(
        w: &Weights,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[cout, cin, kernel, kernel], Role::Conv)?,
            bias: if bias { Some(w.get("bias", &[cout], Role::Param)?) } else { None },
            kernel,
            opts: Conv2dOpts { stride, padding, ..Default::default() },
        })
    }

    /// Zero padding after (bottom, right) that differs from the padding before.
    pub fn with_padding_end(mut self, end: usize) -> Self {
        self.opts.padding_end = Some(end);
        self
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(ctx, x, &self.weight, (self.kernel, self.kernel), self.bias.as_ref(), self.opts)
    }

    /// The conv with an activation fused after the bias.
    pub fn forward_act(&self, ctx: &GpuContext, x: &Tensor, act: Activation) -> Result<Tensor> {
        let opts = Conv2dOpts { act: Some(act), ..self.opts };
        ops::conv2d(ctx, x, &self.weight, (self.kernel, self.kernel), self.bias.as_ref(), opts)
    }
}

/// `nn.GroupNorm` with affine parameters.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::Invalid(format!(
                "{}: {groups} groups do not divide {channels} channels",
                w.pp("weight").label()
            )));
        }
        Ok(Self {
            weight: w.get("weight", &[channels], Role::Param)?,
            bias: w.get("bias", &[channels], Role::Param)?,
            groups,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::group_norm(ctx, x, self.groups, &self.weight, &self.bias, self.eps, silu)
    }
}

/// `nn.LayerNorm` over the last dimension, with affine parameters.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim], Role::Param)?,
            bias: w.get("bias", &[dim], Role::Param)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(ctx, x, Some((&self.weight, &self.bias)), self.eps)
    }
}
