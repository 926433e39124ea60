//! `AutoencoderKL` (diffusers' `autoencoder_kl.py` and `vae.py`): the encoder to the latent mean and the
//! decoder back to pixels. The downsampling factor is 2 per block but the last, and `scaling_factor` maps
//! between VAE latents and the UNet's, both from the config.

use serde::Deserialize;

use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, Tensor};
use crate::ops::{self, Conv2dOpts, MatmulOpts};
use crate::weights::Weights;

/// diffusers' `AutoencoderKL` config keys.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_rgb() -> usize {
    3
}
fn default_layers() -> usize {
    1
}
fn default_latent() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Pixels per latent along each side.
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }
}

const EPS: f64 = 1e-6;

/// The mid block's single-head self-attention over pixels (`group_norm`, `to_q/k/v`, `to_out.0`).
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale: f32,
}

impl SpatialAttention {
    fn load(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        // SD1.x's VAE files keep the deprecated names (query, key, value, proj_attn).
        let old = w.contains("query.weight");
        let name = |new: &'static str, deprecated: &'static str| w.pp(if old { deprecated } else { new });
        Ok(Self {
            norm: GroupNorm::load(&w.pp("group_norm"), groups, c, EPS)?,
            q: Linear::load(&name("to_q", "query"), c, c, true)?,
            k: Linear::load(&name("to_k", "key"), c, c, true)?,
            v: Linear::load(&name("to_v", "value"), c, c, true)?,
            out: Linear::load(&name("to_out.0", "proj_attn"), c, c, true)?,
            scale: 1.0 / (c as f32).sqrt(),
        })
    }

    /// The projections read the normalized image channels-first and the output projection writes it back
    /// channels-first with the residual added: no transposes.
    fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else {
            return crate::error::shape_err("vae attention", format!("expects (batch, c, h, w), got {:?}", x.shape()));
        };
        let normed = self.norm.forward(ctx, x, false)?.reshape(&[b, c, h * w])?;
        let proj = |l: &Linear| {
            let opts = MatmulOpts { trans_a: true, trans_b: true, bias: l.bias(), ..Default::default() };
            ops::matmul(ctx, &normed, l.weight(), opts)
        };
        let (q, k, v) = (proj(&self.q)?, proj(&self.k)?, proj(&self.v)?);
        let o = ops::attention(ctx, &q, &k, &v, 1, self.scale, false)?;
        let residual = x.reshape(&[b, c, h * w])?;
        let opts = MatmulOpts { trans_c: true, residual: Some(&residual), ..Default::default() };
        self.out.forward_with(ctx, &o, opts)?.reshape(&[b, c, h, w])
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
struct Mid {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

fn resnet_config(cin: usize, cout: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
    }
}

impl Mid {
    fn load(w: &Weights, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            resnet0: ResnetBlock2D::load(&w.pp("resnets.0"), resnet_config(c, c, g))?,
            attention: cfg
                .mid_block_add_attention
                .then(|| SpatialAttention::load(&w.pp("attentions.0"), c, g))
                .transpose()?,
            resnet1: ResnetBlock2D::load(&w.pp("resnets.1"), resnet_config(c, c, g))?,
        })
    }

    fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(ctx, x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(ctx, &x)?;
        }
        self.resnet1.forward(ctx, &x, None)
    }
}

struct Stage {
    /// Output channels.
    out: usize,
    resnets: Vec<ResnetBlock2D>,
    /// Encoder: stride-2 conv padded (0, 1); decoder: nearest 2x then conv.
    sampler: Option<Conv2d>,
}

/// The decoder: latents (batch, latent_channels, h, w) to images (batch, 3, h * f, w * f) in about [-1, 1].
pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: Mid,
    mid_channels: usize,
    up: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The encoder: images in [-1, 1] to the latent distribution's mean.
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Stage>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

fn check(cfg: &VaeConfig) -> Result<()> {
    if cfg.block_out_channels.is_empty() || cfg.shift_factor.is_some_and(|s| s != 0.0) {
        return Err(Error::Invalid("vae config: needs block_out_channels and no shift_factor".into()));
    }
    Ok(())
}

impl Decoder {
    pub fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        check(cfg)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (g, l) = (cfg.norm_num_groups, cfg.latent_channels);
        let d = w.pp("decoder");
        let mut up = Vec::new();
        let mut prev = ch[n - 1];
        for i in 0..n {
            let out = ch[n - 1 - i];
            let b = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &b.pp(format!("resnets.{j}")),
                        resnet_config(if j == 0 { prev } else { out }, out, g),
                    )
                })
                .collect::<Result<_>>()?;
            let sampler =
                (i + 1 < n).then(|| Conv2d::load(&b.pp("upsamplers.0.conv"), out, out, 3, 1, 1, true)).transpose()?;
            up.push(Stage { out, resnets, sampler });
            prev = out;
        }
        Ok(Self {
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| Conv2d::load(&w.pp("post_quant_conv"), l, l, 1, 1, 0, true))
                .transpose()?,
            conv_in: Conv2d::load(&d.pp("conv_in"), l, ch[n - 1], 3, 1, 1, true)?,
            mid: Mid::load(&d.pp("mid_block"), ch[n - 1], cfg)?,
            mid_channels: ch[n - 1],
            up,
            norm_out: GroupNorm::load(&d.pp("conv_norm_out"), g, ch[0], EPS)?,
            conv_out: Conv2d::load(&d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1, true)?,
        })
    }

    /// Bytes of the largest activation decoding an (h, w) latent makes (one image): what must fit one buffer
    /// binding. SD's VAE at 512x512 needs 256 MiB in f32, over many devices' 128 MiB binding limit.
    pub fn largest_activation_bytes(&self, h: usize, w: usize, act: DType) -> u64 {
        let mut res = h * w;
        let mut max = self.mid_channels * res;
        for stage in &self.up {
            max = max.max(stage.out * res);
            if stage.sampler.is_some() {
                res *= 4;
                max = max.max(stage.out * res);
            }
        }
        DType::storage_bytes(act, max) as u64
    }

    /// The latent tile side a tiled decode uses within `limit` bytes per binding: the largest of diffusers'
    /// usual sizes (64 down to 8) whose activations fit, or None.
    pub fn decode_tile(&self, limit: u64, act: DType) -> Option<usize> {
        [64, 48, 32, 24, 16, 8].into_iter().find(|&t| self.largest_activation_bytes(t, t, act) <= limit)
    }

    /// Decodes VAE latents (already divided by `scaling_factor`).
    pub fn forward(&self, ctx: &GpuContext, z: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(ctx, z)?,
            None => z.clone(),
        };
        x = self.mid.forward(ctx, &self.conv_in.forward(ctx, &x)?)?;
        for stage in &self.up {
            for r in &stage.resnets {
                x = r.forward_cat(ctx, x, None, None)?;
            }
            if let Some(conv) = &stage.sampler {
                x = conv.forward_with(ctx, &x, None, Conv2dOpts { upsample: true, ..Default::default() })?;
            }
        }
        self.norm_out.conv(ctx, &self.conv_out, &x, true, None, Default::default())
    }
}

impl Encoder {
    pub fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        check(cfg)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (g, l) = (cfg.norm_num_groups, cfg.latent_channels);
        let e = w.pp("encoder");
        let mut down = Vec::new();
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let b = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::load(
                        &b.pp(format!("resnets.{j}")),
                        resnet_config(if j == 0 { prev } else { out }, out, g),
                    )
                })
                .collect::<Result<_>>()?;
            let sampler = (i + 1 < n)
                .then(|| {
                    Ok::<_, Error>(
                        Conv2d::load(&b.pp("downsamplers.0.conv"), out, out, 3, 2, 0, true)?.with_padding_end(1),
                    )
                })
                .transpose()?;
            down.push(Stage { out, resnets, sampler });
            prev = out;
        }
        Ok(Self {
            conv_in: Conv2d::load(&e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1, true)?,
            down,
            mid: Mid::load(&e.pp("mid_block"), ch[n - 1], cfg)?,
            norm_out: GroupNorm::load(&e.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            conv_out: Conv2d::load(&e.pp("conv_out"), ch[n - 1], 2 * l, 3, 1, 1, true)?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| Conv2d::load(&w.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0, true))
                .transpose()?,
            latent_channels: l,
        })
    }

    /// The latent distribution of images (batch, 3, h, w) in [-1, 1]: (batch, 2 * latent_channels, h / f,
    /// w / f), the mean's channels then the log-variance's (not yet scaled).
    pub fn moments(&self, ctx: &GpuContext, image: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(ctx, image)?;
        for stage in &self.down {
            for r in &stage.resnets {
                x = r.forward_cat(ctx, x, None, None)?;
            }
            if let Some(conv) = &stage.sampler {
                x = conv.forward(ctx, &x)?;
            }
        }
        x = self.mid.forward(ctx, &x)?;
        x = self.norm_out.conv(ctx, &self.conv_out, &x, true, None, Default::default())?;
        match &self.quant_conv {
            Some(q) => q.forward(ctx, &x),
            None => Ok(x),
        }
    }

    /// Bytes of the largest activation encoding one (h, w) image makes: what must fit one buffer binding.
    pub fn largest_activation_bytes(&self, h: usize, w: usize, act: DType) -> u64 {
        let mut res = h * w;
        let mut prev = self.down.first().map_or(0, |s| s.out);
        let mut max = prev * res;
        for stage in &self.down {
            max = max.max(stage.out.max(prev) * res);
            if stage.sampler.is_some() {
                res /= 4;
            }
            prev = stage.out;
        }
        DType::storage_bytes(act, max) as u64
    }

    /// The mean of the latent distribution of images (batch, 3, h, w) in [-1, 1] (not yet scaled).
    pub fn forward(&self, ctx: &GpuContext, image: &Tensor) -> Result<Tensor> {
        let x = self.moments(ctx, image)?;
        // The first half of the channels is the mean, the second the log-variance.
        let (b, h, w) = (x.dim(0), x.dim(2), x.dim(3));
        let per = self.latent_channels * h * w;
        if b == 1 {
            return ops::lincomb(ctx, &[1, self.latent_channels, h, w], &[ops::Term::new(1.0, &x)]);
        }
        let halves: Vec<Tensor> = (0..b)
            .map(|i| {
                let t = ops::Term { tensor: &x, offset: i * 2 * per, coef: 1.0 };
                ops::lincomb(ctx, &[1, self.latent_channels, h, w], &[t])
            })
            .collect::<Result<_>>()?;
        halves.iter().skip(1).try_fold(halves[0].clone(), |acc, t| ops::concat(ctx, &acc, t, 0))
    }
}
