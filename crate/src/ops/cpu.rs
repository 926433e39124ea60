//! The CPU fallback of every op, on candle's CPU backend (f32). Launchers check shapes first, so both
//! backends refuse the same inputs with the same errors; then they call these instead of a kernel.

use candle_core::{D, DType as CDType, Device, Tensor as CTensor};

use super::Activation;
use crate::error::Result;
use crate::gpu::Tensor;

fn wrap(t: CTensor) -> Result<Tensor> {
    Ok(Tensor::from_cpu(t.contiguous()?))
}

pub fn act(t: &CTensor, act: Option<Activation>) -> Result<CTensor> {
    Ok(match act {
        None => t.clone(),
        Some(Activation::Silu) => candle_nn::ops::silu(t)?,
        Some(Activation::Gelu) => t.gelu_erf()?,
        Some(Activation::QuickGelu) => (t * candle_nn::ops::sigmoid(&(t * 1.702)?)?)?,
        Some(Activation::Relu) => t.relu()?,
    })
}

pub fn binary(op: super::BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.cpu()?, b.cpu()?);
    wrap(match op {
        super::BinaryOp::Add => a.broadcast_add(b)?,
        super::BinaryOp::Mul => a.broadcast_mul(b)?,
        super::BinaryOp::Sub => a.broadcast_sub(b)?,
    })
}

pub fn activation(x: &Tensor, a: Activation) -> Result<Tensor> {
    wrap(act(x.cpu()?, Some(a))?)
}

pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let x = x.cpu()?;
    let half = x.dim(D::Minus1)? / 2;
    wrap((x.narrow(D::Minus1, 0, half)? * x.narrow(D::Minus1, half, half)?.gelu_erf()?)?)
}

pub fn affine(x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
    wrap(x.cpu()?.affine(alpha as f64, beta as f64)?)
}

pub fn soft_clamp(x: &Tensor, limit: f32) -> Result<Tensor> {
    wrap(((x.cpu()? / limit as f64)?.tanh()? * limit as f64)?)
}

pub fn lincomb(shape: &[usize], terms: &[super::Term<'_>]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut acc: Option<CTensor> = None;
    for t in terms {
        let part = (t.tensor.cpu()?.flatten_all()?.narrow(0, t.offset, n)? * t.coef as f64)?;
        acc = Some(match acc {
            Some(a) => (a + part)?,
            None => part,
        });
    }
    wrap(acc.expect("lincomb checked for at least one term").reshape(shape)?)
}

/// The bias rows of a fused GEMM for `batch` items of `n` (see [`super::MatmulOpts::bias_at`]), as
/// (batch, 1, n).
fn bias_rows(bias: &Tensor, at: (usize, usize), batch: usize, n: usize) -> Result<CTensor> {
    let flat = bias.cpu()?.flatten_all()?;
    let rows: Vec<CTensor> =
        (0..batch).map(|b| flat.narrow(0, at.0 + b * at.1, n)).collect::<candle_core::Result<_>>()?;
    Ok(CTensor::stack(&rows, 0)?.unsqueeze(1)?)
}

pub fn matmul(a: &Tensor, b: &Tensor, opts: &super::MatmulOpts<'_>, batch: usize) -> Result<Tensor> {
    let mut a = a.cpu()?.clone();
    let mut b = b.cpu()?.clone();
    if let Some(ln) = opts.layer_norm {
        a = candle_nn::ops::layer_norm(&a.contiguous()?, ln.gamma.cpu()?, ln.beta.cpu()?, ln.eps)?;
    }
    if opts.trans_a {
        a = a.transpose(D::Minus2, D::Minus1)?;
    }
    if opts.trans_b {
        b = b.transpose(D::Minus2, D::Minus1)?;
    }
    let mut out = a.contiguous()?.broadcast_matmul(&b.contiguous()?)?;
    let dims = out.dims().to_vec();
    let (m, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if let Some(bias) = opts.bias {
        let rows = bias_rows(bias, opts.bias_at, batch, n)?;
        out = out.reshape((batch, m, n))?.broadcast_add(&rows)?.reshape(dims.as_slice())?;
    }
    out = act(&out, opts.act)?;
    if opts.geglu {
        let half = n / 2;
        out = (out.narrow(D::Minus1, 0, half)? * out.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
    }
    if opts.trans_c {
        out = out.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    }
    if let Some(r) = opts.residual {
        out = (out + r.cpu()?)?;
    }
    wrap(out)
}

#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    cout: usize,
    cin: usize,
    kernel: (usize, usize),
    bias: Option<&Tensor>,
    opts: &super::Conv2dOpts<'_>,
) -> Result<Tensor> {
    let w = weight.cpu()?.reshape((cout, cin, kernel.0, kernel.1))?;
    let (p0, p1) = (opts.padding, opts.padding_end.unwrap_or(opts.padding));
    let mut x = x.cpu()?.clone();
    if let Some(more) = opts.concat {
        x = CTensor::cat(&[&x, more.cpu()?], 1)?;
    }
    if let Some(n) = &opts.norm {
        let p = n.params;
        let normed = group_norm(&Tensor::from_cpu(x), p.groups, &p.gamma, &p.beta, p.eps, n.silu)?;
        x = normed.cpu()?.clone();
    }
    if opts.upsample {
        let (_, _, h, w) = x.dims4()?;
        x = x.upsample_nearest2d(2 * h, 2 * w)?;
    }
    let out = if p0 == p1 {
        x.conv2d(&w, p0, opts.stride, 1, 1)?
    } else {
        x.pad_with_zeros(2, p0, p1)?.pad_with_zeros(3, p0, p1)?.conv2d(&w, 0, opts.stride, 1, 1)?
    };
    let batch = out.dim(0)?;
    let out = match bias {
        Some(b) => out.broadcast_add(&bias_rows(b, opts.bias_at, batch, cout)?.reshape((batch, cout, 1, 1))?)?,
        None => out,
    };
    let mut out = act(&out, opts.act)?;
    if let Some(r) = opts.residual {
        out = (out + r.cpu()?)?;
    }
    wrap(out)
}

/// Normalizes rows of (rows, len) and applies an affine per channel of `s` elements.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
    let x = x.cpu()?;
    let shape = x.dims().to_vec();
    let (n, c) = (shape[0], shape[1]);
    let g = x.reshape((n, groups, ()))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let centered = g.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps as f64)?.sqrt()?)?.reshape(shape.as_slice())?;
    let mut affine_shape = vec![1, c];
    affine_shape.resize(shape.len(), 1);
    let out = normed
        .broadcast_mul(&weight.cpu()?.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&bias.cpu()?.reshape(affine_shape.as_slice())?)?;
    wrap(if silu { candle_nn::ops::silu(&out)? } else { out })
}

pub fn layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f32) -> Result<Tensor> {
    let x = x.cpu()?;
    let c = x.dim(D::Minus1)?;
    let (g, b) = match affine {
        Some((g, b)) => (g.cpu()?.clone(), b.cpu()?.clone()),
        None => (CTensor::ones(c, CDType::F32, &Device::Cpu)?, CTensor::zeros(c, CDType::F32, &Device::Cpu)?),
    };
    wrap(candle_nn::ops::layer_norm(&x.contiguous()?, &g, &b, eps)?)
}

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    wrap(candle_nn::ops::softmax_last_dim(&x.cpu()?.contiguous()?)?)
}

/// softmax(Q K^T * scale) V with q (b, lq, h * d), k and v (b, lk, h * d).
pub fn attention(q: &CTensor, k: &CTensor, v: &CTensor, heads: usize, scale: f64, causal: bool) -> Result<CTensor> {
    let split = |t: &CTensor| -> Result<CTensor> {
        let (b, l, hd) = t.dims3()?;
        Ok(t.reshape((b, l, heads, hd / heads))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if causal {
        let (lq, lk) = (scores.dim(2)?, scores.dim(3)?);
        let mask: Vec<f32> =
            (0..lq).flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        scores = scores.broadcast_add(&CTensor::from_vec(mask, (lq, lk), &Device::Cpu)?)?;
    }
    let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
    let (b, h, l, d) = out.dims4()?;
    Ok(out.transpose(1, 2)?.reshape((b, l, h * d))?)
}

pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let x = x.cpu()?;
    let (_, _, h, w) = x.dims4()?;
    wrap(x.upsample_nearest2d(2 * h, 2 * w)?)
}

pub fn concat(a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    wrap(CTensor::cat(&[a.cpu()?, b.cpu()?], dim)?)
}

pub fn transpose_last2(x: &Tensor) -> Result<Tensor> {
    wrap(x.cpu()?.transpose(D::Minus2, D::Minus1)?)
}

pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let rows = table.dim(0);
    let idx: Vec<u32> =
        ids.cpu()?.flatten_all()?.to_vec1::<f32>()?.iter().map(|&i| (i as u32).min(rows as u32 - 1)).collect();
    let n = idx.len();
    let picked = table.cpu()?.index_select(&CTensor::from_vec(idx, n, &Device::Cpu)?, 0)?;
    let mut shape = ids.shape().to_vec();
    shape.push(table.dim(1));
    wrap(picked.reshape(shape)?)
}

pub fn timestep_embedding(t: &Tensor, cfg: &super::TimestepEmbedding) -> Result<Tensor> {
    let ts = t.cpu()?.to_vec1::<f32>()?;
    wrap(CTensor::from_vec(cfg.values(&ts), (ts.len(), cfg.dim), &Device::Cpu)?)
}
