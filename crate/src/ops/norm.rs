//! Group norm (optionally fused with SiLU), layer norm and softmax over the last dimension.

use bytemuck::{Pod, Zeroable};

use super::{act_dtype, check_act};
use crate::error::{Result, shape_err};
use crate::gpu::{GpuContext, Kernel, Spec, Tensor, grid_1d};

const NORM: Kernel =
    Kernel { name: "norm", sources: &[include_str!("../kernels/norm.wgsl")], entry: "main", inputs: 4, outputs: 1 };

const SOFTMAX: Kernel = Kernel {
    name: "softmax",
    sources: &[include_str!("../kernels/softmax.wgsl")],
    entry: "main",
    inputs: 1,
    outputs: 1,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormParams {
    rows: u32,
    len: u32,
    groups: u32,
    s: u32,
    eps: f32,
    silu: u32,
    affine: u32,
    split: u32,
    c2: u32,
    _pad: [u32; 2],
}

#[allow(clippy::too_many_arguments)]
fn norm(
    ctx: &GpuContext,
    op: &'static str,
    x: &Tensor,
    more: Option<&Tensor>,
    affine: Option<(&Tensor, &Tensor)>,
    channels: usize,
    params: NormParams,
) -> Result<Tensor> {
    let mut checked = vec![x];
    checked.extend(more);
    if let Some((g, b)) = affine {
        if g.shape() != [channels] || b.shape() != [channels] {
            return shape_err(
                op,
                format!(
                    "weight {:?} and bias {:?} should be [{channels}] for input {:?}",
                    g.shape(),
                    b.shape(),
                    x.shape()
                ),
            );
        }
        checked.extend([g, b]);
    }
    check_act(op, &checked)?;
    if ctx.is_cpu() {
        let joined;
        let x = match more {
            Some(m) => {
                joined = super::concat(ctx, x, m, 1)?;
                &joined
            }
            None => x,
        };
        return match (op, affine) {
            ("group_norm", Some((g, b))) => {
                super::cpu::group_norm(x, params.groups as usize, g, b, params.eps, params.silu != 0)
            }
            _ => super::cpu::layer_norm(x, affine, params.eps),
        };
    }
    let mut shape = x.shape().to_vec();
    if more.is_some() {
        shape[1] = channels;
    }
    let out = Tensor::empty(ctx, op, &shape, x.dtype())?;
    let dummy = Tensor::empty(ctx, op, &[1], x.dtype())?;
    let (g, b) = affine.unwrap_or((&dummy, &dummy));
    let x2 = more.unwrap_or(&dummy);
    let spec = Spec::new(act_dtype(x)?).alias("out_t", "act").flag("STATS", false);
    let groups = grid_1d(ctx, params.rows);
    ctx.dispatch(op, &NORM, &spec, bytemuck::bytes_of(&params), &[x, g, b, x2], &[&out], groups)?;
    Ok(out)
}

/// Group norm over x (batch, channels, ...) with `groups` groups, per-channel weight and bias, and an optional
/// fused SiLU (the `norm -> silu` pair that opens every ResNet block).
pub fn group_norm(
    ctx: &GpuContext,
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    group_norm_cat(ctx, x, None, groups, weight, bias, eps, silu)
}

/// [`group_norm`] over concat(x, more) on the channel axis (the UNet's up path: features and a skip
/// connection), without the concatenation being made.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_cat(
    ctx: &GpuContext,
    x: &Tensor,
    more: Option<&Tensor>,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let (params, c) = group_norm_params(x, more, groups, eps, silu)?;
    norm(ctx, "group_norm", x, more, Some((weight, bias)), c, params)
}

/// The kernel parameters of a group norm over concat(x, more) with `groups` groups, and its channels.
fn group_norm_params(
    x: &Tensor,
    more: Option<&Tensor>,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<(NormParams, usize)> {
    const OP: &str = "group_norm";
    let c2 = match more {
        None => 0,
        Some(m)
            if x.rank() >= 2 && m.rank() == x.rank() && m.dim(0) == x.dim(0) && m.shape()[2..] == x.shape()[2..] =>
        {
            m.dim(1)
        }
        Some(m) => return shape_err(OP, format!("cannot concatenate {:?} to {:?}", m.shape(), x.shape())),
    };
    if x.rank() < 2 || groups == 0 || !(x.dim(1) + c2).is_multiple_of(groups) {
        return shape_err(
            OP,
            format!("{groups} groups do not divide the {} channels of {:?}", x.dim(1) + c2, x.shape()),
        );
    }
    let (n, c) = (x.dim(0), x.dim(1) + c2);
    let s = x.numel() / (n * x.dim(1)).max(1);
    let params = NormParams {
        rows: (n * groups) as u32,
        len: (c / groups * s) as u32,
        groups: groups as u32,
        s: s as u32,
        eps,
        silu: silu as u32,
        affine: 1,
        split: if more.is_some() { x.dim(1) as u32 } else { 0 },
        c2: c2 as u32,
        _pad: [0; 2],
    };
    Ok((params, c))
}

/// A group norm's parameters, with its scale and shift also packed as one (2, channels) tensor (gamma; beta)
/// for the convolutions that normalize their input as they load it.
#[derive(Clone, Debug)]
pub struct GnParams {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub packed: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GnParams {
    pub fn new(ctx: &GpuContext, gamma: Tensor, beta: Tensor, groups: usize, eps: f32) -> Result<Self> {
        let c = gamma.numel();
        let packed = super::concat(ctx, &gamma, &beta, 0)?.reshape(&[2, c])?;
        Ok(Self { gamma, beta, packed, groups, eps })
    }
}

/// The statistics of [`group_norm_cat`]: per (sample, group) mean and 1 / std of concat(x, more), as a
/// (batch * groups, 2) f32 tensor, for a conv that normalizes as it loads ([`super::Conv2dOpts::norm`]).
pub fn group_norm_stats(ctx: &GpuContext, x: &Tensor, more: Option<&Tensor>, p: &GnParams) -> Result<Tensor> {
    const OP: &str = "group_norm";
    let (params, c) = group_norm_params(x, more, p.groups, p.eps, false)?;
    if p.gamma.shape() != [c] {
        return shape_err(OP, format!("{c} channels for a norm of {:?}", p.gamma.shape()));
    }
    let mut checked = vec![x];
    checked.extend(more);
    check_act(OP, &checked)?;
    let rows = params.rows as usize;
    if ctx.is_cpu() {
        return super::cpu::group_norm_stats(x, more, p.groups, p.eps);
    }
    let out = Tensor::empty(ctx, OP, &[rows, 2], crate::gpu::DType::F32)?;
    let dummy = Tensor::empty(ctx, OP, &[1], x.dtype())?;
    let spec = Spec::new(act_dtype(x)?).alias("out_t", "f32").flag("STATS", true);
    let x2 = more.unwrap_or(&dummy);
    let groups = grid_1d(ctx, params.rows);
    ctx.dispatch(OP, &NORM, &spec, bytemuck::bytes_of(&params), &[x, &dummy, &dummy, x2], &[&out], groups)?;
    Ok(out)
}

/// Layer norm over the last dimension, with optional elementwise weight and bias.
pub fn layer_norm(ctx: &GpuContext, x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    if x.rank() == 0 || x.dim(-1) == 0 {
        return shape_err(OP, format!("cannot normalize {:?}", x.shape()));
    }
    let c = x.dim(-1);
    let params = NormParams {
        rows: (x.numel() / c) as u32,
        len: c as u32,
        groups: 1,
        s: 1,
        eps,
        silu: 0,
        affine: affine.is_some() as u32,
        split: 0,
        c2: 0,
        _pad: [0; 2],
    };
    norm(ctx, OP, x, None, affine, c, params)
}

/// Softmax over the last dimension.
pub fn softmax(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    softmax_scaled(ctx, x, 1.0)
}

/// Softmax over the last dimension of x * scale.
pub fn softmax_scaled(ctx: &GpuContext, x: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "softmax";
    check_act(OP, &[x])?;
    if x.rank() == 0 || x.dim(-1) == 0 {
        return shape_err(OP, format!("cannot take a softmax over {:?}", x.shape()));
    }
    if ctx.is_cpu() {
        return if scale == 1.0 {
            super::cpu::softmax(x)
        } else {
            super::cpu::softmax(&super::affine(ctx, x, scale, 0.0)?)
        };
    }
    let out = Tensor::empty(ctx, OP, x.shape(), x.dtype())?;
    let rows = (x.numel() / x.dim(-1)) as u32;
    let params = [rows, x.dim(-1) as u32, scale.to_bits(), 0];
    let spec = Spec::new(act_dtype(x)?);
    ctx.dispatch(OP, &SOFTMAX, &spec, bytemuck::cast_slice(&params), &[x], &[&out], grid_1d(ctx, rows))?;
    Ok(out)
}
