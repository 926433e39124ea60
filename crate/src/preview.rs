//! Cheap per-step previews: the latent projected to RGB with a 4x3 matrix plus bias (computed on the GPU, only
//! the small RGBA image is read back), as stable-diffusion.cpp does for SD latents.

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor};
use crate::pipeline::Image;

const PREVIEW: Kernel =
    Kernel { name: "preview", sources: &[include_str!("kernels/preview.wgsl")], entry: "main", inputs: 1, outputs: 1 };

/// Latent-to-RGB factors: rgb = sum_c latent[c] * factors[c] + bias, in [-1, 1]. A model folder may carry its
/// own in `preview.json` ({"latent_rgb_factors": [[r, g, b] x 4], "latent_rgb_bias": [r, g, b]}).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreviewFactors {
    pub latent_rgb_factors: Vec<[f32; 3]>,
    pub latent_rgb_bias: [f32; 3],
}

impl Default for PreviewFactors {
    /// The SD1.x/SD2.x factors for UNet-space latents (stable-diffusion.cpp's).
    fn default() -> Self {
        Self {
            latent_rgb_factors: vec![
                [0.337366, 0.216344, 0.257386],
                [0.165636, 0.386828, 0.046994],
                [-0.267803, 0.237036, 0.223517],
                [-0.178022, -0.200862, -0.678514],
            ],
            latent_rgb_bias: [-0.017478, -0.055834, -0.105825],
        }
    }
}

impl PreviewFactors {
    pub fn from_json(text: &str) -> Result<Self> {
        let f: Self = serde_json::from_str(text).map_err(|e| Error::Invalid(format!("preview.json: {e}")))?;
        if f.latent_rgb_factors.is_empty() || f.latent_rgb_factors.len() > 4 {
            return Err(Error::Invalid("preview.json: needs 1 to 4 rows of latent_rgb_factors".into()));
        }
        Ok(f)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    hw: u32,
    channels: u32,
    _pad: [u32; 2],
    f: [[f32; 4]; 4],
    bias: [f32; 4],
}

/// The RGBA preview (latent resolution) of UNet-space latents (1, channels, h, w).
pub async fn preview(ctx: &GpuContext, latents: &Tensor, factors: &PreviewFactors) -> Result<Image> {
    let &[1, c, h, w] = latents.shape() else {
        return Err(Error::Invalid(format!("preview: expects one latent (1, c, h, w), got {:?}", latents.shape())));
    };
    let rows = factors.latent_rgb_factors.len().min(c);
    if ctx.is_cpu() {
        let data = latents.to_vec_f32(ctx).await?;
        let mut rgba = vec![255u8; h * w * 4];
        for i in 0..h * w {
            for k in 0..3 {
                let v = factors.latent_rgb_bias[k]
                    + (0..rows).map(|ch| data[ch * h * w + i] * factors.latent_rgb_factors[ch][k]).sum::<f32>();
                rgba[i * 4 + k] = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        return Ok(Image { width: w, height: h, rgba });
    }
    let mut f = [[0f32; 4]; 4];
    for (row, src) in f.iter_mut().zip(&factors.latent_rgb_factors[..rows]) {
        row[..3].copy_from_slice(src);
    }
    let b = factors.latent_rgb_bias;
    let params = Params { hw: (h * w) as u32, channels: rows as u32, _pad: [0; 2], f, bias: [b[0], b[1], b[2], 0.0] };
    let out = Tensor::empty(ctx, "preview", &[h * w], DType::F32)?;
    let spec = Spec::new(latents.dtype() == DType::F16);
    let groups = [((h * w) as u32).div_ceil(256), 1, 1];
    ctx.dispatch("preview", &PREVIEW, &spec, bytemuck::bytes_of(&params), &[latents], &[&out], groups)?;
    let rgba = out.to_bytes(ctx).await?;
    Ok(Image { width: w, height: h, rgba })
}

/// Previews through TAESD (diffusers' `AutoencoderTiny` decoder): each step's latent decoded at full image
/// resolution on the GPU, a few percent of a VAE decode, for SD 1.x/2.x latents.
pub struct TinyPreview {
    decoder: crate::models::taesd::TinyDecoder,
    latent_channels: usize,
    act: DType,
}

impl TinyPreview {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` (a diffusers AutoencoderTiny folder)
    /// with its parameters in `act` (f32, or f16 with shader-f16) and its convolutions in f16 or `act`.
    pub fn load(ctx: &GpuContext, src: &dyn crate::pipeline::ModelSource, act: DType) -> Result<Self> {
        use crate::models::taesd::{TinyConfig, TinyDecoder};
        let cfg: TinyConfig = crate::models::parse_config(&src.text("config.json")?, "taesd")?;
        let tensors = src.tensors("diffusion_pytorch_model.safetensors")?;
        let policy = crate::weights::LoadPolicy { act, weights: act };
        let w = crate::weights::Weights::new(ctx, tensors.as_ref(), policy);
        let decoder = TinyDecoder::load(&w, &cfg)?;
        Ok(Self { decoder, latent_channels: cfg.latent_channels, act })
    }

    /// The RGBA image (8x the latent's size) of UNet-space latents (1, channels, h, w).
    pub async fn preview(&self, ctx: &GpuContext, latents: &Tensor) -> Result<Image> {
        let c = latents.shape().get(1).copied().unwrap_or(0);
        if c != self.latent_channels {
            return Err(Error::Invalid(format!(
                "the TAESD preview decodes {}-channel latents; this model's have {c}: use the latent projection",
                self.latent_channels
            )));
        }
        let image = if latents.dtype() == self.act || ctx.is_cpu() {
            self.decoder.forward(ctx, latents)?
        } else {
            self.decoder.forward(ctx, &crate::ops::cast(ctx, latents, self.act)?)?
        };
        crate::pipeline::to_rgba(ctx, &image).await
    }
}
