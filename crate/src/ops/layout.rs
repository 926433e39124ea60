//! Data movement: nearest 2x upsampling, concatenation, swapping the last two dimensions (NCHW <-> tokens x
//! channels), f32 <-> f16 casts, and the sinusoidal timestep embedding.

use bytemuck::{Pod, Zeroable};

use super::{act_dtype, check_act};
use crate::error::{Error, Result, shape_err};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor, grid_1d};

macro_rules! kernel {
    ($name:literal, $inputs:literal) => {
        Kernel {
            name: $name,
            sources: &[include_str!(concat!("../kernels/", $name, ".wgsl"))],
            entry: "main",
            inputs: $inputs,
            outputs: 1,
        }
    };
}

const UPSAMPLE: Kernel = kernel!("upsample", 1);
const CONCAT: Kernel = kernel!("concat", 2);
const TRANSPOSE: Kernel = kernel!("transpose", 1);
const CAST: Kernel = kernel!("cast", 1);
const TIMESTEP: Kernel = kernel!("timestep", 1);
const EMBEDDING: Kernel = kernel!("embedding", 2);

/// Rows of `table` (rows, dim; f32, or f16 stored packed) picked by `ids` (an f32 tensor of row indices):
/// (ids..., dim) in the activation dtype `act`.
pub fn embedding(ctx: &GpuContext, table: &Tensor, ids: &Tensor, act: DType) -> Result<Tensor> {
    const OP: &str = "embedding";
    let &[rows, dim] = table.shape() else {
        return shape_err(OP, format!("the table must be (rows, dim), got {:?}", table.shape()));
    };
    if ids.dtype() != DType::F32 || rows == 0 {
        return shape_err(OP, format!("ids must be f32 row indices into {:?}, got {ids:?}", table.shape()));
    }
    let (ttype, packed) = match (table.dtype(), act) {
        (DType::F32, DType::F32) => ("f32", false),
        (DType::F16, DType::F16) => ("f16", false),
        (DType::F16, _) => ("u32", true),
        (d, _) => {
            return Err(Error::DType {
                op: OP,
                dtype: d,
                detail: format!(" table {:?} for {act} output", table.shape()),
            });
        }
    };
    if ctx.is_cpu() {
        return super::cpu::embedding(table, ids);
    }
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let out = Tensor::empty(ctx, OP, &shape, act)?;
    check_act(OP, &[&out])?;
    let n = ids.numel();
    let params = [n as u32, dim as u32, rows as u32, 0];
    let spec = Spec::new(act == DType::F16).alias("ttype", ttype).flag("TABLE_PACKED", packed);
    let groups = grid_1d(ctx, ((n * dim) as u32).div_ceil(256));
    ctx.dispatch(OP, &EMBEDDING, &spec, bytemuck::cast_slice(&params), &[ids, table], &[&out], groups)?;
    Ok(out)
}

/// Nearest-neighbour 2x upsampling of x (batch, channels, h, w).
pub fn upsample_nearest2x(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x";
    check_act(OP, &[x])?;
    let &[b, c, h, w] = x.shape() else {
        return shape_err(OP, format!("input must be (batch, channels, height, width), got {:?}", x.shape()));
    };
    if ctx.is_cpu() {
        return super::cpu::upsample_nearest2x(x);
    }
    let out = Tensor::empty(ctx, OP, &[b, c, 2 * h, 2 * w], x.dtype())?;
    let n = out.numel() as u32;
    let params = [n, h as u32, w as u32, 0];
    let spec = Spec::new(act_dtype(x)?);
    ctx.dispatch(OP, &UPSAMPLE, &spec, bytemuck::cast_slice(&params), &[x], &[&out], grid_1d(ctx, n.div_ceil(256)))?;
    Ok(out)
}

/// Concatenates a and b along `dim` (all other dimensions equal).
pub fn concat(ctx: &GpuContext, a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    check_act(OP, &[a, b])?;
    let same_rest = a.rank() == b.rank()
        && dim < a.rank()
        && a.shape().iter().zip(b.shape()).enumerate().all(|(i, (x, y))| i == dim || x == y);
    if !same_rest {
        return shape_err(OP, format!("cannot concatenate {:?} and {:?} along dimension {dim}", a.shape(), b.shape()));
    }
    let mut shape = a.shape().to_vec();
    shape[dim] += b.shape()[dim];
    if ctx.is_cpu() {
        return super::cpu::concat(a, b, dim);
    }
    let out = Tensor::empty(ctx, OP, &shape, a.dtype())?;
    let n = out.numel() as u32;
    let inner: usize = a.shape()[dim + 1..].iter().product();
    let params = [n, a.shape()[dim] as u32, b.shape()[dim] as u32, inner as u32];
    let spec = Spec::new(act_dtype(a)?);
    ctx.dispatch(OP, &CONCAT, &spec, bytemuck::cast_slice(&params), &[a, b], &[&out], grid_1d(ctx, n.div_ceil(256)))?;
    Ok(out)
}

/// Swaps the last two dimensions: (.., rows, cols) -> (.., cols, rows).
pub fn transpose_last2(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose";
    check_act(OP, &[x])?;
    if x.rank() < 2 {
        return shape_err(OP, format!("needs at least 2 dimensions, got {:?}", x.shape()));
    }
    let (rows, cols) = (x.dim(-2), x.dim(-1));
    let batch = x.numel() / (rows * cols).max(1);
    let mut shape = x.shape().to_vec();
    let r = shape.len();
    shape.swap(r - 2, r - 1);
    if ctx.is_cpu() {
        return super::cpu::transpose_last2(x);
    }
    let out = Tensor::empty(ctx, OP, &shape, x.dtype())?;
    let params = [rows as u32, cols as u32, 0, 0];
    let spec = Spec::new(act_dtype(x)?);
    let groups = [cols.div_ceil(16) as u32, rows.div_ceil(16) as u32, batch as u32];
    ctx.dispatch(OP, &TRANSPOSE, &spec, bytemuck::cast_slice(&params), &[x], &[&out], groups)?;
    Ok(out)
}

/// (batch, channels, h, w) -> (batch, h * w, channels).
pub fn nchw_to_tokens(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    let &[b, c, h, w] = x.shape() else {
        return shape_err(
            "nchw_to_tokens",
            format!("input must be (batch, channels, height, width), got {:?}", x.shape()),
        );
    };
    transpose_last2(ctx, &x.reshape(&[b, c, h * w])?)
}

/// (batch, h * w, channels) -> (batch, channels, h, w).
pub fn tokens_to_nchw(ctx: &GpuContext, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let &[b, hw, c] = x.shape() else {
        return shape_err("tokens_to_nchw", format!("input must be (batch, tokens, channels), got {:?}", x.shape()));
    };
    if hw != h * w {
        return shape_err("tokens_to_nchw", format!("{hw} tokens are not a {h}x{w} image ({:?})", x.shape()));
    }
    transpose_last2(ctx, x)?.reshape(&[b, c, h, w])
}

/// Converts between f32 and f16 (needs shader-f16); a tensor already in `dtype` is returned as is.
pub fn cast(ctx: &GpuContext, x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    check_act(OP, &[x])?;
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    if !matches!(dtype, DType::F32 | DType::F16) {
        return Err(Error::DType { op: OP, dtype, detail: " (cast converts between f32 and f16)".into() });
    }
    if ctx.is_cpu() {
        // The CPU fallback keeps everything in f32.
        return Ok(x.clone());
    }
    let out = Tensor::empty(ctx, OP, x.shape(), dtype)?;
    let n = x.numel() as u32;
    let (src, dst) = if dtype == DType::F16 { ("f32", "f16") } else { ("f16", "f32") };
    let spec = Spec::new(true).alias("src", src).alias("dst", dst);
    ctx.dispatch(OP, &CAST, &spec, bytemuck::cast_slice(&[n, 0, 0, 0]), &[x], &[&out], grid_1d(ctx, n.div_ceil(256)))?;
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TimestepParams {
    n: u32,
    dim: u32,
    shift: f32,
    flip: u32,
    log_max_period: f32,
    scale: f32,
    _pad: [u32; 2],
}

/// How diffusers' `Timesteps` module embeds a timestep.
#[derive(Clone, Copy, Debug)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
    pub max_period: f32,
    pub scale: f32,
}

impl TimestepEmbedding {
    /// Stable Diffusion's UNet: flip_sin_to_cos true, downscale_freq_shift 0.
    pub fn sd(dim: usize) -> Self {
        Self { dim, flip_sin_to_cos: true, downscale_freq_shift: 0.0, max_period: 10000.0, scale: 1.0 }
    }
}

impl TimestepEmbedding {
    /// The embeddings of `ts`, (ts.len(), dim) row-major, computed on the host: a UNet's timestep is a
    /// number the host knows, so its embedding is uploaded with the step rather than computed by a kernel.
    pub fn values(&self, ts: &[f32]) -> Vec<f32> {
        let half = self.dim / 2;
        let mut out = Vec::with_capacity(ts.len() * self.dim);
        for &tv in ts {
            let args: Vec<f32> = (0..half)
                .map(|i| {
                    let freq = (-self.max_period.ln() * i as f32 / (half as f32 - self.downscale_freq_shift)).exp();
                    self.scale * tv * freq
                })
                .collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            let (first, second) = if self.flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
            out.extend(first.iter().chain(&second));
            if self.dim % 2 == 1 {
                out.push(0.0);
            }
        }
        out
    }
}

/// Sinusoidal embeddings (n, dim) of the f32 timesteps t (n), in `dtype`.
pub fn timestep_embedding(ctx: &GpuContext, t: &Tensor, cfg: TimestepEmbedding, dtype: DType) -> Result<Tensor> {
    const OP: &str = "timestep_embedding";
    if t.rank() != 1 || t.dtype() != DType::F32 {
        return shape_err(OP, format!("timesteps must be a 1-D f32 tensor, got {t:?}"));
    }
    if cfg.dim < 2 || cfg.dim / 2 == 0 || (cfg.dim / 2) as f32 == cfg.downscale_freq_shift {
        return shape_err(
            OP,
            format!("cannot embed into {} dimensions with shift {}", cfg.dim, cfg.downscale_freq_shift),
        );
    }
    if ctx.is_cpu() {
        return super::cpu::timestep_embedding(t, &cfg);
    }
    let n = t.dim(0);
    let out = Tensor::empty(ctx, OP, &[n, cfg.dim], dtype)?;
    check_act(OP, &[&out])?;
    let params = TimestepParams {
        n: n as u32,
        dim: cfg.dim as u32,
        shift: cfg.downscale_freq_shift,
        flip: cfg.flip_sin_to_cos as u32,
        log_max_period: cfg.max_period.ln(),
        scale: cfg.scale,
        _pad: [0; 2],
    };
    let spec = Spec::new(dtype == DType::F16);
    let groups = [((n * cfg.dim) as u32).div_ceil(256), 1, 1];
    ctx.dispatch(OP, &TIMESTEP, &spec, bytemuck::bytes_of(&params), &[t], &[&out], groups)?;
    Ok(out)
}
