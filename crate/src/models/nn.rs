//! The layers models are built from (linear, conv, norms), each loading its weights by the reference
//! implementation's names (`weight`, `bias`) and calling ops.

use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, Activation, Conv2dOpts, GnInput, GnParams, LnParams, MatmulOpts};
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

    /// A 1x1 convolution's weight (out, in, 1, 1) as the linear layer it is.
    pub fn load_1x1(w: &Weights, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[out_dim, in_dim, 1, 1], Role::Conv)?.reshape(&[out_dim, in_dim])?,
            bias: Some(w.get("bias", &[out_dim], Role::Param)?),
        })
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layers' outputs side by side as one layer over the same input (their weights stacked by rows),
    /// or None when their weights cannot be stacked (mixed dtypes or layouts, some biased and some not).
    pub fn stack(ctx: &GpuContext, parts: &[&Linear]) -> Result<Option<Linear>> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
        if !Tensor::can_concat_rows(&weights) || !(biases.is_empty() || biases.len() == parts.len()) {
            return Ok(None);
        }
        // Biases are small and stacked once, at load: a concat kernel per part is fine.
        let mut bias: Option<Tensor> = None;
        for b in biases {
            bias = Some(match bias {
                Some(acc) => ops::concat(ctx, &acc, b, 0)?,
                None => b.clone(),
            });
        }
        Ok(Some(Linear { weight: Tensor::concat_rows(ctx, &weights)?, bias }))
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        ops::linear(ctx, x, &self.weight, self.bias.as_ref())
    }

    /// The layer with an activation fused after the bias.
    pub fn forward_act(&self, ctx: &GpuContext, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::linear_act(ctx, x, &self.weight, self.bias.as_ref(), Some(act))
    }

    /// The layer with the fusions of `opts` (its bias is this layer's).
    pub fn forward_with(&self, ctx: &GpuContext, x: &Tensor, opts: MatmulOpts<'_>) -> Result<Tensor> {
        ops::linear_with(ctx, x, &self.weight, MatmulOpts { bias: self.bias.as_ref(), ..opts })
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

    /// The conv with the fusions of `extra` (its stride and padding are this layer's). `bias_rows`
    /// (tensor, offset, batch stride) replaces the layer's bias with a row per batch item.
    pub fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &Tensor,
        bias_rows: Option<(&Tensor, usize, usize)>,
        extra: Conv2dOpts<'_>,
    ) -> Result<Tensor> {
        let (bias, bias_at) = match bias_rows {
            Some((t, off, stride)) => (Some(t), (off, stride)),
            None => (self.bias.as_ref(), (0, 0)),
        };
        let opts = Conv2dOpts {
            stride: self.opts.stride,
            padding: self.opts.padding,
            padding_end: self.opts.padding_end,
            bias_at,
            ..extra
        };
        ops::conv2d(ctx, x, &self.weight, (self.kernel, self.kernel), bias, opts)
    }

    /// Takes the bias out of the layer (it is then added elsewhere, e.g. folded into another bias).
    pub fn take_bias(&mut self) -> Option<Tensor> {
        self.bias.take()
    }
}

/// `nn.GroupNorm` with affine parameters.
pub struct GroupNorm {
    params: GnParams,
}

impl GroupNorm {
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::Invalid(format!(
                "{}: {groups} groups do not divide {channels} channels",
                w.pp("weight").label()
            )));
        }
        let gamma = w.get("weight", &[channels], Role::Param)?;
        let beta = w.get("bias", &[channels], Role::Param)?;
        Ok(Self { params: GnParams::new(w.ctx(), gamma, beta, groups, eps as f32)? })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor, silu: bool) -> Result<Tensor> {
        self.forward_cat(ctx, x, None, silu)
    }

    /// The norm over concat(x, more) on channels, the concatenation read in place.
    pub fn forward_cat(&self, ctx: &GpuContext, x: &Tensor, more: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        let p = &self.params;
        ops::group_norm_cat(ctx, x, more, p.groups, &p.gamma, &p.beta, p.eps, silu)
    }

    /// `conv` over this norm of x (concatenated with `extra.concat` when given), then SiLU when `silu`, the
    /// norm applied as the conv loads its input: the normalized image is never made. `extra` adds the conv's
    /// other fusions.
    pub fn conv(
        &self,
        ctx: &GpuContext,
        conv: &Conv2d,
        x: &Tensor,
        silu: bool,
        bias_rows: Option<(&Tensor, usize, usize)>,
        extra: Conv2dOpts<'_>,
    ) -> Result<Tensor> {
        let stats = ops::group_norm_stats(ctx, x, extra.concat, &self.params)?;
        let norm = Some(GnInput { params: &self.params, stats: &stats, silu });
        conv.forward_with(ctx, x, bias_rows, Conv2dOpts { norm, ..extra })
    }
}

/// `nn.LayerNorm` over the last dimension, with affine parameters.
pub struct LayerNorm {
    params: LnParams,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let gamma = w.get("weight", &[dim], Role::Param)?;
        let beta = w.get("bias", &[dim], Role::Param)?;
        Ok(Self { params: LnParams::new(w.ctx(), gamma, beta, eps as f32)? })
    }

    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        let p = &self.params;
        ops::layer_norm(ctx, x, Some((&p.gamma, &p.beta)), p.eps)
    }

    /// The parameters, for fusing the norm into the matmul that reads its output.
    pub fn params(&self) -> &LnParams {
        &self.params
    }
}
