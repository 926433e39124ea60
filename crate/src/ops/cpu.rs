//! The CPU fallback of every op, on candle's CPU backend (f32). Launchers check shapes first, so both
//! backends refuse the same inputs with the same errors; then they call these instead of a kernel.

use candle_core::{D, DType as CDType, Device, Tensor as CTensor};

use super::Activation;
use super::cpu_kernels as fast;
use crate::error::Result;
use crate::gpu::Tensor;

/// Wall time (ms) by op family while [`profile`] runs; `None` the rest of the time.
static PROFILE: std::sync::Mutex<Option<Vec<(&'static str, f64)>>> = std::sync::Mutex::new(None);

/// Runs `f` and returns, with its result, the wall time its CPU fallback ops took by family (ms, largest
/// first; empty when none ran): where a step's time goes, for `bench unet --cpu` and the diagnostics page's
/// CPU benchmark. Each op's wall time includes the tasks it ran on other threads. The tally is the process's:
/// CPU ops another thread runs meanwhile count too (the CLI and a model worker run one engine at a time).
pub fn profile<T>(f: impl FnOnce() -> T) -> (T, Vec<(String, f64)>) {
    *PROFILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    let r = f();
    let mut times = PROFILE.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    (r, times.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// `f()`, its wall time added to `family`'s while a profile runs (two clock reads otherwise skipped).
fn timed<T>(family: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if PROFILE.lock().map_or(true, |p| p.is_none()) {
        return f();
    }
    let start = crate::bench::Instant::now();
    let r = f();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if let Some(times) = PROFILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        match times.iter_mut().find(|(k, _)| *k == family) {
            Some((_, t)) => *t += ms,
            None => times.push((family, ms)),
        }
    }
    r
}

/// A CPU tensor's candle tensor, contiguous (the same one when it already is).
fn contiguous(t: &Tensor) -> Result<CTensor> {
    Ok(t.cpu()?.contiguous()?)
}

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
    timed("elementwise", || {
        let (a, b) = (a.cpu()?, b.cpu()?);
        wrap(match op {
            super::BinaryOp::Add => a.broadcast_add(b)?,
            super::BinaryOp::Mul => a.broadcast_mul(b)?,
            super::BinaryOp::Sub => a.broadcast_sub(b)?,
        })
    })
}

pub fn activation(x: &Tensor, a: Activation) -> Result<Tensor> {
    timed("elementwise", || wrap(act(x.cpu()?, Some(a))?))
}

pub fn geglu(x: &Tensor) -> Result<Tensor> {
    timed("elementwise", || {
        let x = x.cpu()?;
        let half = x.dim(D::Minus1)? / 2;
        wrap((x.narrow(D::Minus1, 0, half)? * x.narrow(D::Minus1, half, half)?.gelu_erf()?)?)
    })
}

pub fn affine(x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
    timed("elementwise", || wrap(x.cpu()?.affine(alpha as f64, beta as f64)?))
}

pub fn soft_clamp(x: &Tensor, limit: f32) -> Result<Tensor> {
    timed("elementwise", || wrap(((x.cpu()? / limit as f64)?.tanh()? * limit as f64)?))
}

pub fn lincomb(shape: &[usize], terms: &[super::Term<'_>]) -> Result<Tensor> {
    timed("elementwise", || {
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
    })
}

pub fn matmul(
    a: &Tensor,
    b: &Tensor,
    opts: &super::MatmulOpts<'_>,
    batch: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    timed("matmul", || {
        let (a, b) = (a.cpu()?.contiguous()?, b.cpu()?.contiguous()?);
        let ln = opts
            .layer_norm
            .map(|ln| Ok::<_, crate::Error>((ln.gamma.cpu()?.contiguous()?, ln.beta.cpu()?.contiguous()?, ln.eps)))
            .transpose()?;
        let ln_views =
            ln.as_ref().map(|(g, b, eps)| Ok::<_, crate::Error>((fast::view(g)?, fast::view(b)?, *eps))).transpose()?;
        let bias = opts.bias.map(contiguous).transpose()?;
        let bias_view = bias.as_ref().map(fast::view).transpose()?;
        let residual = opts.residual.map(contiguous).transpose()?;
        let res_view = residual.as_ref().map(fast::view).transpose()?;
        let o = fast::Matmul {
            trans_a: opts.trans_a,
            trans_b: opts.trans_b,
            trans_c: opts.trans_c,
            geglu: opts.geglu,
            layer_norm: ln_views.as_ref().map(|(g, b, eps)| (g.get(), b.get(), *eps)),
            epi: fast::Epilogue {
                bias: bias_view.as_ref().map(|v| v.get()),
                bias_at: opts.bias_at,
                act: opts.act,
                residual: res_view.as_ref().map(|v| v.get()),
            },
        };
        wrap(fast::matmul(&a, &b, &o, batch, out_shape)?)
    })
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
    let family = if kernel == (3, 3) { "conv 3x3" } else { "conv other" };
    timed(family, || {
        let x = x.cpu()?.contiguous()?;
        let more = opts.concat.map(contiguous).transpose()?;
        let batch = x.dim(0)?;
        let norm = match &opts.norm {
            Some(n) => {
                let (stats, g, b) = (
                    n.stats.cpu()?.contiguous()?,
                    n.params.gamma.cpu()?.contiguous()?,
                    n.params.beta.cpu()?.contiguous()?,
                );
                let (sv, gv, bv) = (fast::view(&stats)?, fast::view(&g)?, fast::view(&b)?);
                Some((fast::norm_affine(sv.get(), n.params.groups, gv.get(), bv.get(), batch), n.silu))
            }
            None => None,
        };
        debug_assert_eq!(x.dim(1)? + more.as_ref().map_or(Ok(0), |m| m.dim(1))?, cin);
        let input = fast::ConvInput { x: &x, more: more.as_ref(), norm, upsample: opts.upsample };
        let w = weight.cpu()?.contiguous()?;
        let wv = fast::view(&w)?;
        let bias = bias.map(contiguous).transpose()?;
        let bias_view = bias.as_ref().map(fast::view).transpose()?;
        let residual = opts.residual.map(contiguous).transpose()?;
        let res_view = residual.as_ref().map(fast::view).transpose()?;
        let epi = fast::Epilogue {
            bias: bias_view.as_ref().map(|v| v.get()),
            bias_at: opts.bias_at,
            act: opts.act,
            residual: res_view.as_ref().map(|v| v.get()),
        };
        let pads = (opts.padding, opts.padding_end.unwrap_or(opts.padding));
        wrap(fast::conv2d(&input, wv.get(), cout, kernel, pads, opts.stride, &epi)?)
    })
}

/// Per (sample, group) mean and 1 / std of concat(x, more) as (batch * groups, 2).
pub fn group_norm_stats(x: &Tensor, more: Option<&Tensor>, groups: usize, eps: f32) -> Result<Tensor> {
    timed("group norm", || {
        let x = x.cpu()?.contiguous()?;
        let more = more.map(contiguous).transpose()?;
        let stats = fast::group_stats(&x, more.as_ref(), groups, eps)?;
        let rows = stats.len();
        wrap(fast::tensor(stats.into_iter().flatten().collect(), &[rows, 2])?)
    })
}

/// Normalizes rows of (rows, len) and applies an affine per channel of `s` elements.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f32, silu: bool) -> Result<Tensor> {
    timed("group norm", || {
        let x = x.cpu()?.contiguous()?;
        let (g, b) = (weight.cpu()?.contiguous()?, bias.cpu()?.contiguous()?);
        let (gv, bv) = (fast::view(&g)?, fast::view(&b)?);
        wrap(fast::group_norm(&x, groups, gv.get(), bv.get(), eps, silu)?)
    })
}

pub fn layer_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f32) -> Result<Tensor> {
    timed("layer norm", || {
        let x = x.cpu()?;
        let c = x.dim(D::Minus1)?;
        let (g, b) = match affine {
            Some((g, b)) => (g.cpu()?.clone(), b.cpu()?.clone()),
            None => (CTensor::ones(c, CDType::F32, &Device::Cpu)?, CTensor::zeros(c, CDType::F32, &Device::Cpu)?),
        };
        wrap(candle_nn::ops::layer_norm(&x.contiguous()?, &g, &b, eps)?)
    })
}

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    timed("softmax", || wrap(candle_nn::ops::softmax_last_dim(&x.cpu()?.contiguous()?)?))
}

/// Attention over the heads in `hd` columns of q, k and v (see [`super::Cols`]), each read in place.
pub fn attention_heads(
    (q, k, v): (&super::Cols<'_>, &super::Cols<'_>, &super::Cols<'_>),
    heads: usize,
    hd: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    timed("attention", || {
        let (qt, kt, vt) = (q.t.cpu()?.contiguous()?, k.t.cpu()?.contiguous()?, v.t.cpu()?.contiguous()?);
        let h = |t, c: &super::Cols<'_>| fast::Heads { t, col: c.col };
        wrap(fast::attention(h(&qt, q), h(&kt, k), h(&vt, v), heads, hd, scale, causal)?)
    })
}

/// The reference the self-checks hold the GPU's attention to, composed of candle ops:
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
    timed("layout", || {
        let x = x.cpu()?;
        let (_, _, h, w) = x.dims4()?;
        wrap(x.upsample_nearest2d(2 * h, 2 * w)?)
    })
}

pub fn concat(a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    timed("layout", || wrap(CTensor::cat(&[a.cpu()?, b.cpu()?], dim)?))
}

pub fn transpose_last2(x: &Tensor) -> Result<Tensor> {
    timed("layout", || wrap(x.cpu()?.transpose(D::Minus2, D::Minus1)?))
}

pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    timed("layout", || {
        let rows = table.dim(0);
        let idx: Vec<u32> =
            ids.cpu()?.flatten_all()?.to_vec1::<f32>()?.iter().map(|&i| (i as u32).min(rows as u32 - 1)).collect();
        let n = idx.len();
        let picked = table.cpu()?.index_select(&CTensor::from_vec(idx, n, &Device::Cpu)?, 0)?;
        let mut shape = ids.shape().to_vec();
        shape.push(table.dim(1));
        wrap(picked.reshape(shape)?)
    })
}

pub fn timestep_embedding(t: &Tensor, cfg: &super::TimestepEmbedding) -> Result<Tensor> {
    timed("layout", || {
        let ts = t.cpu()?.to_vec1::<f32>()?;
        wrap(CTensor::from_vec(cfg.values(&ts), (ts.len(), cfg.dim), &Device::Cpu)?)
    })
}
