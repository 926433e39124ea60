//! `AutoencoderTiny` (TAESD, diffusers' `autoencoder_tiny.py`): a small conv-only encoder and decoder for
//! SD latents, cheap enough to decode a preview after every denoising step. It works on the UNet's latents
//! directly (scaling factor 1).

use serde::Deserialize;

use super::nn::Conv2d;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Tensor};
use crate::ops::{self, Activation};
use crate::weights::Weights;

/// diffusers' `AutoencoderTiny` config keys.
#[derive(Clone, Debug, Deserialize)]
pub struct TinyConfig {
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_relu")]
    pub act_fn: String,
    #[serde(default = "default_two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "default_magnitude")]
    pub latent_magnitude: f32,
}

fn default_rgb() -> usize {
    3
}
fn default_latent() -> usize {
    4
}
fn default_relu() -> String {
    "relu".into()
}
fn default_two() -> usize {
    2
}
fn default_magnitude() -> f32 {
    3.0
}

/// `AutoencoderTinyBlock`: conv-relu-conv-relu-conv plus a skip, then ReLU.
struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl Block {
    fn load(w: &Weights, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            convs: [
                Conv2d::load(&w.pp("conv.0"), cin, cout, 3, 1, 1, true)?,
                Conv2d::load(&w.pp("conv.2"), cout, cout, 3, 1, 1, true)?,
                Conv2d::load(&w.pp("conv.4"), cout, cout, 3, 1, 1, true)?,
            ],
            skip: (cin != cout).then(|| Conv2d::load(&w.pp("skip"), cin, cout, 1, 1, 0, false)).transpose()?,
        })
    }

    fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward_act(ctx, x, Activation::Relu)?;
        let h = self.convs[1].forward_act(ctx, &h, Activation::Relu)?;
        let h = self.convs[2].forward(ctx, &h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(ctx, x)?,
            None => x.clone(),
        };
        ops::relu(ctx, &ops::add(ctx, &h, &skip)?)
    }
}

/// One element of the `nn.Sequential` of an encoder or decoder.
enum Layer {
    Conv(Conv2d),
    ConvRelu(Conv2d),
    Block(Box<Block>),
    Upsample,
}

fn run(ctx: &GpuContext, layers: &[Layer], x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    for layer in layers {
        x = match layer {
            Layer::Conv(c) => c.forward(ctx, &x)?,
            Layer::ConvRelu(c) => c.forward_act(ctx, &x, Activation::Relu)?,
            Layer::Block(b) => b.forward(ctx, &x)?,
            Layer::Upsample => ops::upsample_nearest2x(ctx, &x)?,
        };
    }
    Ok(x)
}

fn check(cfg: &TinyConfig) -> Result<()> {
    let ok = cfg.act_fn == "relu"
        && cfg.upsampling_scaling_factor == 2
        && !cfg.decoder_block_out_channels.is_empty()
        && cfg.decoder_block_out_channels.len() == cfg.num_decoder_blocks.len()
        && !cfg.encoder_block_out_channels.is_empty()
        && cfg.encoder_block_out_channels.len() == cfg.num_encoder_blocks.len();
    if !ok {
        return Err(Error::Invalid(
            "tiny autoencoder config: needs relu, 2x upsampling and one block count per block width".into(),
        ));
    }
    Ok(())
}

/// The TAESD decoder: UNet latents to images in about [-1, 1].
pub struct TinyDecoder {
    layers: Vec<Layer>,
    magnitude: f32,
}

impl TinyDecoder {
    pub fn load(w: &Weights, cfg: &TinyConfig) -> Result<Self> {
        check(cfg)?;
        let w = w.pp("decoder.layers");
        let ch = &cfg.decoder_block_out_channels;
        // Sequential indices: conv, relu, then per block its tiny blocks, an upsample (not last), a conv.
        let mut layers = vec![Layer::ConvRelu(Conv2d::load(&w.pp(0), cfg.latent_channels, ch[0], 3, 1, 1, true)?)];
        let mut idx = 2;
        let n = ch.len();
        for (i, (&c, &blocks)) in ch.iter().zip(&cfg.num_decoder_blocks).enumerate() {
            for _ in 0..blocks {
                layers.push(Layer::Block(Box::new(Block::load(&w.pp(idx), c, c)?)));
                idx += 1;
            }
            let last = i + 1 == n;
            if !last {
                layers.push(Layer::Upsample);
                idx += 1;
            }
            let cout = if last { cfg.out_channels } else { c };
            layers.push(Layer::Conv(Conv2d::load(&w.pp(idx), c, cout, 3, 1, 1, last)?));
            idx += 1;
        }
        Ok(Self { layers, magnitude: cfg.latent_magnitude })
    }

    pub fn forward(&self, ctx: &GpuContext, latents: &Tensor) -> Result<Tensor> {
        let x = ops::soft_clamp(ctx, latents, self.magnitude)?;
        // The network outputs [0, 1]; diffusers maps it to [-1, 1].
        ops::affine(ctx, &run(ctx, &self.layers, &x)?, 2.0, -1.0)
    }
}

/// The TAESD encoder: images in [-1, 1] to UNet latents.
pub struct TinyEncoder {
    layers: Vec<Layer>,
}

impl TinyEncoder {
    pub fn load(w: &Weights, cfg: &TinyConfig) -> Result<Self> {
        check(cfg)?;
        let w = w.pp("encoder.layers");
        let ch = &cfg.encoder_block_out_channels;
        let mut layers = Vec::new();
        let mut idx = 0;
        for (i, (&c, &blocks)) in ch.iter().zip(&cfg.num_encoder_blocks).enumerate() {
            let conv = if i == 0 {
                Conv2d::load(&w.pp(idx), cfg.in_channels, c, 3, 1, 1, true)?
            } else {
                Conv2d::load(&w.pp(idx), c, c, 3, 2, 1, false)?
            };
            layers.push(Layer::Conv(conv));
            idx += 1;
            for _ in 0..blocks {
                layers.push(Layer::Block(Box::new(Block::load(&w.pp(idx), c, c)?)));
                idx += 1;
            }
        }
        let last = *ch.last().expect("checked non-empty");
        layers.push(Layer::Conv(Conv2d::load(&w.pp(idx), last, cfg.latent_channels, 3, 1, 1, true)?));
        Ok(Self { layers })
    }

    pub fn forward(&self, ctx: &GpuContext, image: &Tensor) -> Result<Tensor> {
        // The network takes [0, 1].
        run(ctx, &self.layers, &ops::affine(ctx, image, 0.5, 0.5)?)
    }
}
