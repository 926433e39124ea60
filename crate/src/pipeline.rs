//! The text-to-image pipeline: request -> tokens -> text embeddings -> denoising loop (a callback per step
//! with the GPU-resident latent, cancellation between steps) -> VAE decode -> RGBA. Equal to diffusers'
//! `StableDiffusionPipeline` (classifier-free guidance with a negative prompt, skipped at guidance <= 1) and
//! `LatentConsistencyModelPipeline` (a UNet with `time_cond_proj_dim`: guidance embedding, no CFG), and from
//! init images to `StableDiffusionImg2ImgPipeline` (img2img, [`StableDiffusion::start_from`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Tensor};
pub use crate::image::Image;
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::parse_config;
use crate::models::unet_2d::{UNet2DConditionModel, UNetConfig, guidance_embedding};
use crate::models::vae::{Decoder, Encoder, VaeConfig};
use crate::ops::FiniteCheck;
use crate::ops::{self, Term};
use crate::rng::TorchRng;
use crate::schedulers::{self, SchedulerConfig, SchedulerKind, StepPlan};
use crate::tokenizer::{self, ClipTokenizer};
use crate::weights::embedding::Embedding;
use crate::weights::lora::{self, Lora};
use crate::weights::original::Part;
use crate::weights::{LoadPolicy, Patch, TensorSource, Weights};

/// Where a model's files come from: a diffusers folder on disk, or files handed over by the page.
pub trait ModelSource {
    /// A text file, e.g. `unet/config.json`.
    fn text(&self, path: &str) -> Result<String>;
    /// Whether the file exists.
    fn exists(&self, path: &str) -> bool;
    /// The tensors of a safetensors file, e.g. `unet/diffusion_pytorch_model.safetensors`.
    fn tensors(&self, path: &str) -> Result<Box<dyn TensorSource + '_>>;
}

/// A diffusers-layout folder on disk (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/).
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource(pub std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl ModelSource for DirSource {
    fn text(&self, path: &str) -> Result<String> {
        let p = self.0.join(path);
        std::fs::read_to_string(&p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
    }

    fn exists(&self, path: &str) -> bool {
        self.0.join(path).is_file()
    }

    fn tensors(&self, path: &str) -> Result<Box<dyn TensorSource + '_>> {
        Ok(Box::new(crate::weights::Safetensors::open(&self.0.join(path))?))
    }
}

/// The model at `path`: a diffusers folder, or a single-file checkpoint (`.safetensors` or stable-diffusion.cpp
/// `.gguf`, original SD names) with `config` supplying any config, tokenizer or scheduler file.
#[cfg(not(target_arch = "wasm32"))]
pub fn open_model(path: &std::path::Path, config: Option<&std::path::Path>) -> Result<Box<dyn ModelSource>> {
    let shown = path.display();
    if path.is_dir() {
        if config.is_some() {
            return Err(Error::Invalid(format!("{shown} is a diffusers folder: --config is for single-file models")));
        }
        if !path.join("model_index.json").is_file() && !path.join("unet").is_dir() {
            return Err(Error::Invalid(format!("{shown} is not a diffusers model folder (no model_index.json)")));
        }
        return Ok(Box::new(DirSource(path.to_path_buf())));
    }
    if !path.is_file() {
        return Err(Error::Invalid(format!("{shown}: no such file or folder")));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" | "gguf" => Ok(Box::new(crate::checkpoint::Checkpoint::open(path, config)?)),
        "ckpt" | "pt" | "pth" | "bin" => Err(Error::Invalid(format!(
            "{shown} is a pickle file, which can run code when read: latent-gen reads .safetensors and .gguf \
             (convert it with a trusted tool first)"
        ))),
        _ => Err(Error::Invalid(format!(
            "{shown}: unknown model file type (expected a diffusers folder, a .safetensors checkpoint or a .gguf)"
        ))),
    }
}

/// Model files held in memory, by their path in the diffusers layout (small models handed over whole).
#[derive(Default)]
pub struct MemorySource {
    files: std::collections::HashMap<String, Vec<u8>>,
    ranged: std::collections::HashMap<String, (u64, crate::weights::RangeReader)>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the file at `path` (e.g. `unet/config.json`).
    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(path.into(), bytes);
    }

    /// Adds the safetensors file at `path`, `size` bytes read through `read` one tensor at a time.
    pub fn insert_ranged(&mut self, path: impl Into<String>, size: u64, read: crate::weights::RangeReader) {
        self.ranged.insert(path.into(), (size, read));
    }

    fn get(&self, path: &str) -> Result<&Vec<u8>> {
        self.files.get(path).ok_or_else(|| Error::Invalid(format!("the model has no file {path}")))
    }
}

impl ModelSource for MemorySource {
    fn text(&self, path: &str) -> Result<String> {
        String::from_utf8(self.get(path)?.clone()).map_err(|_| Error::Invalid(format!("{path} is not UTF-8 text")))
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path) || self.ranged.contains_key(path)
    }

    fn tensors(&self, path: &str) -> Result<Box<dyn TensorSource + '_>> {
        if let Some((size, read)) = self.ranged.get(path) {
            return Ok(Box::new(crate::weights::RangedSafetensors::new(read.clone(), *size, path)?));
        }
        let bytes = crate::weights::Bytes::Owned(self.get(path)?.clone());
        Ok(Box::new(crate::weights::Safetensors::new(bytes, path)?))
    }
}

/// The weights file of a component: the full-precision name, or the `.fp16` variant repositories ship.
pub(crate) fn weights_file(src: &dyn ModelSource, dir: &str, stem: &str) -> Result<String> {
    for name in [format!("{dir}/{stem}.safetensors"), format!("{dir}/{stem}.fp16.safetensors")] {
        if src.exists(&name) {
            return Ok(name);
        }
    }
    Err(Error::Invalid(format!(
        "{dir}/ has no {stem}.safetensors (or .fp16.safetensors): is this a diffusers model folder?"
    )))
}

/// What to generate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    /// Defaults to the UNet's sample_size times the VAE's downsampling factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Defaults to the model's scheduler config.
    pub scheduler: Option<SchedulerKind>,
    /// Variations (A1111's): the initial noise is slerped from the seed's toward this seed's by
    /// `subseed_strength` (0: the seed's image exactly, 1: the subseed's).
    pub subseed: Option<u64>,
    pub subseed_strength: f32,
    /// Read the prompts literally (diffusers' behaviour) instead of in A1111's weighting syntax, where
    /// `(word:1.5)` weighs a word's tokens (see [`crate::prompt`]).
    pub literal_prompt: bool,
    /// img2img (with init images): how much of the schedule runs, in (0, 1]; the image is noised to the
    /// timestep at `steps * (1 - strength)` and denoised from there (diffusers' and A1111's "denoising
    /// strength"). Ignored without init images.
    pub strength: f32,
    /// Prompts longer than the text encoder's 75 tokens: cut off (diffusers' behaviour, the default), or
    /// encoded in 75-token chunks side by side (A1111's).
    #[serde(deserialize_with = "default_if_absent")]
    pub long_prompt: LongPrompt,
}

/// A field that may come as null or undefined (from JavaScript) as well as absent: its default then.
fn default_if_absent<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// What happens to the tokens of a prompt past the text encoder's 75.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongPrompt {
    /// They are cut off.
    #[default]
    Truncate,
    /// The prompt is encoded in chunks of 75 tokens, each as a prompt of its own, and the UNet attends to
    /// all of them (the negative prompt padded to as many chunks with empty ones).
    Chunks,
}

impl std::str::FromStr for LongPrompt {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "truncate" => Ok(LongPrompt::Truncate),
            "chunks" => Ok(LongPrompt::Chunks),
            _ => Err(Error::Invalid(format!("unknown long-prompt mode {s:?}: truncate or chunks"))),
        }
    }
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 20,
            guidance: 7.5,
            width: None,
            height: None,
            scheduler: None,
            subseed: None,
            subseed_strength: 0.0,
            strength: 0.75,
            literal_prompt: false,
            long_prompt: LongPrompt::Truncate,
        }
    }
}

/// A1111's `slerp(val, low, high)` on noise shaped (channels, h, w) (its `create_random_tensors`): spherical
/// interpolation of each (channel, column) vector along h, with its fallback to a (weight-swapped) lerp when the
/// two are nearly parallel. `val` 0 gives `low`, 1 gives `high`.
pub fn slerp_noise(val: f32, low: &[f32], high: &[f32], shape: [usize; 3]) -> Vec<f32> {
    let [c, h, w] = shape;
    let at = |ch: usize, y: usize, x: usize| (ch * h + y) * w + x;
    let mut dots = vec![0f32; c * w];
    for ch in 0..c {
        for x in 0..w {
            let (mut nl, mut nh, mut d) = (0f32, 0f32, 0f32);
            for y in 0..h {
                let (a, b) = (low[at(ch, y, x)], high[at(ch, y, x)]);
                nl += a * a;
                nh += b * b;
                d += a * b;
            }
            dots[ch * w + x] = d / (nl.sqrt() * nh.sqrt());
        }
    }
    if dots.iter().sum::<f32>() / dots.len() as f32 > 0.9995 {
        return low.iter().zip(high).map(|(a, b)| a * val + b * (1.0 - val)).collect();
    }
    let mut out = vec![0f32; low.len()];
    for ch in 0..c {
        for x in 0..w {
            let omega = dots[ch * w + x].clamp(-1.0, 1.0).acos();
            let so = omega.sin();
            let (kl, kh) = (((1.0 - val) * omega).sin() / so, (val * omega).sin() / so);
            for y in 0..h {
                let i = at(ch, y, x);
                out[i] = kl * low[i] + kh * high[i];
            }
        }
    }
    out
}

/// Spherical interpolation of two noise tensors taken whole (`t` 0 gives `a`, 1 gives `b`), falling back to
/// a linear one when they are nearly parallel: how latent-space walks move between seeds, keeping the
/// noise's norm where a linear blend would shrink it.
pub fn slerp(t: f32, a: &[f32], b: &[f32]) -> Vec<f32> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = (dot / (na * nb).max(1e-30)).clamp(-1.0, 1.0);
    let t = t as f64;
    let (ka, kb) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        (((1.0 - t) * theta).sin() / theta.sin(), (t * theta).sin() / theta.sin())
    };
    a.iter().zip(b).map(|(x, y)| (ka * *x as f64 + kb * *y as f64) as f32).collect()
}

/// The "parameters" text the CLI and the page embed in their PNGs (the layout A1111-style tools read).
pub fn parameters_text(req: &Request, scheduler: &str, width: usize, height: usize, model: &str) -> String {
    parameters_text_from(req, scheduler, width, height, model, false)
}

/// [`parameters_text`] of an img2img generation (`img2img`: it started from init images), which adds
/// A1111's "Denoising strength".
pub fn parameters_text_from(
    req: &Request,
    scheduler: &str,
    width: usize,
    height: usize,
    model: &str,
    img2img: bool,
) -> String {
    let strength = if img2img { format!(", Denoising strength: {}", req.strength) } else { String::new() };
    let variation = match req.subseed {
        Some(sub) if req.subseed_strength > 0.0 => {
            format!(", Variation seed: {sub}, Variation seed strength: {}", req.subseed_strength)
        }
        _ => String::new(),
    };
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}{strength}{variation}",
        req.prompt, req.negative_prompt, req.steps, scheduler, req.guidance, req.seed, width, height, model
    )
}

/// An image img2img starts from: RGBA at the generation's size ([`Image::resized`]), and its share when
/// several are blended (weights are normalized to sum to 1).
#[derive(Clone, Debug)]
pub struct InitImage {
    pub image: Image,
    pub weight: f32,
}

/// What an img2img run starts from: the blended clean latent (scaled), the generator after the VAE's
/// samples, and the first step.
struct Init {
    clean: Vec<f32>,
    rng: TorchRng,
    first: usize,
}

/// What the per-step callback sees.
pub struct Step<'a> {
    /// 0-based.
    pub index: usize,
    pub steps: usize,
    pub timestep: f64,
    /// The latent after this step (UNet space), still on the GPU: nothing is read back unless asked.
    pub latents: &'a Tensor,
}

/// What the callback tells the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// LoRAs (each with its scale) and textual-inversion embeddings, applied to a model's text encoder and UNet
/// as their weights load ([`StableDiffusion::load_with`], [`StableDiffusion::apply_adapters`]).
#[derive(Clone, Copy, Default)]
pub struct Adapters<'a> {
    pub loras: &'a [(&'a Lora, f32)],
    pub embeddings: &'a [&'a Embedding],
}

impl Adapters<'_> {
    /// What the text encoder's (`Part::TextEncoder`) or the UNet's weights depend on: the LoRAs with layers
    /// there (by identity and scale) and, for the text encoder, the embeddings.
    fn signature(&self, part: Part) -> String {
        let mut s: Vec<String> = self
            .loras
            .iter()
            .filter(|(l, _)| l.layers.iter().any(|layer| layer.part == part))
            .map(|(l, scale)| format!("{}@{:p}:{scale}", l.name, *l))
            .collect();
        if part == Part::TextEncoder {
            s.extend(self.embeddings.iter().map(|e| format!("{}@{:p}", e.trigger, *e)));
        }
        s.join("\n")
    }
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: Decoder,
    /// The VAE's encoder, which img2img needs: loaded on request ([`StableDiffusion::load_vae_encoder`]),
    /// since text-to-image never runs it.
    pub vae_encoder: Option<Encoder>,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// Warnings about the adapters applied (LoRA tensors this model has no place for).
    pub adapter_warnings: Vec<String>,
    /// The adapters' signatures the text encoder and the UNet were loaded with.
    applied: [String; 2],
    ctx: GpuContext,
}

/// A text encoder and its tokenizer, with the embeddings added and the patch's LoRA updates merged.
fn load_text(
    ctx: &GpuContext,
    src: &dyn ModelSource,
    te: &dyn TensorSource,
    policy: LoadPolicy,
    patch: &mut Patch<'_>,
    embeddings: &[&Embedding],
) -> Result<(ClipTokenizer, ClipTextModel)> {
    let mut clip_config: ClipConfig = parse_config(&src.text("text_encoder/config.json")?, "text_encoder")?;
    let pad = tokenizer::pad_token(
        src.text("tokenizer/tokenizer_config.json").ok().as_deref(),
        src.text("tokenizer/special_tokens_map.json").ok().as_deref(),
    )?;
    let mut tokenizer = ClipTokenizer::from_files(
        &src.text("tokenizer/vocab.json")?,
        &src.text("tokenizer/merges.txt")?,
        &pad,
        clip_config.max_position_embeddings,
    )?;
    if !embeddings.is_empty() {
        // New rows after the vocabulary, one per vector, as diffusers' load_textual_inversion appends them.
        let table = ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"]
            .into_iter()
            .find(|n| te.shape(n).is_some())
            .ok_or_else(|| Error::Invalid("the text encoder has no token embedding table".into()))?;
        let (mut values, mut rows) = (Vec::new(), 0);
        for e in embeddings {
            e.check_width(clip_config.hidden_size)?;
            tokenizer.add_embedding(&e.trigger, (clip_config.vocab_size + rows) as u32, e.vectors())?;
            values.extend_from_slice(&e.values);
            rows += e.vectors();
        }
        patch.rows.insert(table.to_string(), (values, rows));
        clip_config.vocab_size += rows;
    }
    let text_encoder = ClipTextModel::load(&Weights::new(ctx, te, policy).with_patch(patch), clip_config)?;
    Ok((tokenizer, text_encoder))
}

impl StableDiffusion {
    /// Loads every component from `src` with weights stored as `policy` says.
    pub fn load(ctx: &GpuContext, src: &dyn ModelSource, policy: LoadPolicy) -> Result<Self> {
        Self::load_with(ctx, src, policy, Adapters::default())
    }

    /// [`StableDiffusion::load`] with LoRAs merged into the text encoder's and UNet's weights and embeddings
    /// added to the text encoder.
    pub fn load_with(
        ctx: &GpuContext,
        src: &dyn ModelSource,
        policy: LoadPolicy,
        adapters: Adapters<'_>,
    ) -> Result<Self> {
        let te = src.tensors(&weights_file(src, "text_encoder", "model")?)?;
        let un = src.tensors(&weights_file(src, "unet", "diffusion_pytorch_model")?)?;
        let (mut te_patch, un_patch, adapter_warnings) = lora::patches(adapters.loras, te.as_ref(), un.as_ref())?;
        let (tokenizer, text_encoder) = load_text(ctx, src, te.as_ref(), policy, &mut te_patch, adapters.embeddings)?;
        drop(te);
        let unet_config: UNetConfig = parse_config(&src.text("unet/config.json")?, "unet")?;
        let unet =
            UNet2DConditionModel::load(&Weights::new(ctx, un.as_ref(), policy).with_patch(&un_patch), unet_config)?;
        drop(un);
        let vae_config: VaeConfig = parse_config(&src.text("vae/config.json")?, "vae")?;
        let va = src.tensors(&weights_file(src, "vae", "diffusion_pytorch_model")?)?;
        let vae = Decoder::load(&Weights::new(ctx, va.as_ref(), policy), &vae_config)?;
        let scheduler_config = SchedulerConfig::from_json(&src.text("scheduler/scheduler_config.json")?)?;
        if unet.config.in_channels != vae_config.latent_channels {
            return Err(Error::Invalid(format!(
                "the UNet takes {} latent channels but the VAE makes {}",
                unet.config.in_channels, vae_config.latent_channels
            )));
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_encoder: None,
            vae_config,
            scheduler_config,
            adapter_warnings,
            applied: [adapters.signature(Part::TextEncoder), adapters.signature(Part::Unet)],
            ctx: ctx.clone(),
        })
    }

    /// Re-merges the adapters when they changed: the text encoder (and tokenizer) and the UNet are reloaded
    /// from `src`, the same files with the same policy, with `adapters` applied; each only when the LoRAs,
    /// scales or embeddings it depends on differ from those it has. Returns whether anything was reloaded.
    pub fn apply_adapters(
        &mut self,
        src: &dyn ModelSource,
        policy: LoadPolicy,
        adapters: Adapters<'_>,
    ) -> Result<bool> {
        let want = [adapters.signature(Part::TextEncoder), adapters.signature(Part::Unet)];
        if want == self.applied {
            return Ok(false);
        }
        let te = src.tensors(&weights_file(src, "text_encoder", "model")?)?;
        let un = src.tensors(&weights_file(src, "unet", "diffusion_pytorch_model")?)?;
        let (mut te_patch, un_patch, warnings) = lora::patches(adapters.loras, te.as_ref(), un.as_ref())?;
        if want[0] != self.applied[0] {
            let (tokenizer, text_encoder) =
                load_text(&self.ctx, src, te.as_ref(), policy, &mut te_patch, adapters.embeddings)?;
            (self.tokenizer, self.text_encoder) = (tokenizer, text_encoder);
        }
        drop(te);
        if want[1] != self.applied[1] {
            // The old UNet's weights go back to the pool before the new ones are made.
            let config = self.unet.config.clone();
            let w = Weights::new(&self.ctx, un.as_ref(), policy).with_patch(&un_patch);
            self.unet = UNet2DConditionModel::load(&w, config)?;
        }
        self.adapter_warnings = warnings;
        self.applied = want;
        Ok(true)
    }

    /// Loads the VAE's encoder from the same files (a no-op when it is loaded), for img2img.
    pub fn load_vae_encoder(&mut self, src: &dyn ModelSource, policy: LoadPolicy) -> Result<()> {
        if self.vae_encoder.is_some() {
            return Ok(());
        }
        let va = src.tensors(&weights_file(src, "vae", "diffusion_pytorch_model")?)?;
        let encoder = Encoder::load(&Weights::new(&self.ctx, va.as_ref(), policy), &self.vae_config).map_err(|e| {
            Error::Invalid(format!(
                "img2img needs the VAE's encoder, which this model's files lack or hold wrongly: {e}"
            ))
        })?;
        self.vae_encoder = Some(encoder);
        Ok(())
    }

    /// Loads a diffusers folder.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir(ctx: &GpuContext, dir: &std::path::Path, policy: LoadPolicy) -> Result<Self> {
        Self::load(ctx, &DirSource(dir.to_path_buf()), policy)
    }

    /// Loads whatever `path` holds: a diffusers folder, or a single-file checkpoint (`.safetensors`) whose
    /// configs come from `config` (a diffusers folder) where given, else from the file's tensor shapes.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_path(
        ctx: &GpuContext,
        path: &std::path::Path,
        config: Option<&std::path::Path>,
        policy: LoadPolicy,
    ) -> Result<Self> {
        Self::load(ctx, open_model(path, config)?.as_ref(), policy)
    }

    /// Pixels per latent along a side.
    pub fn vae_factor(&self) -> usize {
        self.vae_config.downsampling()
    }

    /// Image sizes must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae_factor() * self.unet.config.downsampling()
    }

    /// The size generated when the request names none.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size * self.vae_factor()
    }

    /// Whether this is a latent consistency model (guidance embedding instead of CFG).
    pub fn is_lcm(&self) -> bool {
        self.unet.config.time_cond_proj_dim.is_some()
    }

    /// The scheduler a request runs.
    pub fn scheduler_kind(&self, req: &Request) -> Result<SchedulerKind> {
        match req.scheduler {
            Some(k) => Ok(k),
            None => self.scheduler_config.default_kind(),
        }
    }

    /// The (width, height) a request generates, checked against what the model can take.
    pub fn size(&self, req: &Request) -> Result<(usize, usize)> {
        let (w, h) = (req.width.unwrap_or(self.default_size()), req.height.unwrap_or(self.default_size()));
        let m = self.size_multiple();
        let max = 4096;
        if w == 0 || h == 0 || !w.is_multiple_of(m) || !h.is_multiple_of(m) || w > max || h > max {
            return Err(Error::Invalid(format!(
                "this model can't make a {w}x{h} image: width and height must be multiples of {m} \
                 (the VAE's factor {} times the UNet's downsampling {}) between {m} and {max}, e.g. {}x{}",
                self.vae_factor(),
                self.unet.config.downsampling(),
                self.default_size(),
                self.default_size()
            )));
        }
        Ok((w, h))
    }

    /// Text embeddings (batch, tokens, dim) of the prompts, in order.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect::<Result<_>>()?;
        self.text_encoder.forward(&self.ctx, &ids)
    }

    /// Runs the request. `on_step` sees every step's latent and may cancel; the result is the decoded image.
    pub async fn generate(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(&Step<'_>) -> Result<Control>,
    ) -> Result<Image> {
        let latents = self.denoise(req, on_step).await?;
        self.decode(&latents).await
    }

    /// [`StableDiffusion::generate`] from init images (img2img).
    pub async fn generate_from(
        &self,
        req: &Request,
        init: &[InitImage],
        on_step: &mut dyn FnMut(&Step<'_>) -> Result<Control>,
    ) -> Result<Image> {
        let latents = self.denoise_from(req, init, on_step).await?;
        self.decode(&latents).await
    }

    /// The denoising loop: the final latent (UNet space).
    pub async fn denoise(
        &self,
        req: &Request,
        on_step: &mut dyn FnMut(&Step<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        self.denoise_from(req, &[], on_step).await
    }

    /// [`StableDiffusion::denoise`] from init images (img2img, see [`StableDiffusion::start_from`]).
    pub async fn denoise_from(
        &self,
        req: &Request,
        init: &[InitImage],
        on_step: &mut dyn FnMut(&Step<'_>) -> Result<Control>,
    ) -> Result<Tensor> {
        let mut run = self.start_from(req, init).await?;
        while let Some(step) = run.step().await? {
            if on_step(&step)? == Control::Cancel {
                return Err(Error::Cancelled);
            }
        }
        Ok(run.latents.clone())
    }

    /// Starts a generation that the caller drives one step at a time (and may await anything between steps,
    /// e.g. a preview readback, or simply stop: that is cancelling).
    pub fn start(&self, req: &Request) -> Result<Denoiser<'_>> {
        self.begin(req, None, None)
    }

    /// Frame `t` (0 to 1) of an interpolation from `a` toward `b`: it starts from the spherical interpolation
    /// of the two requests' initial noises ([`slerp`]) and conditions on the linear interpolation of their
    /// text embeddings (the prompt's and the negative prompt's); every other setting is `a`'s. `t` = 0 is
    /// exactly `a`'s generation and 1 exactly `b`'s with `a`'s settings (the ancestral noise follows `b`'s
    /// seed only there).
    pub fn start_between(&self, a: &Request, b: &Request, t: f32) -> Result<Denoiser<'_>> {
        if !(0.0..=1.0).contains(&t) {
            return Err(Error::Invalid(format!("an interpolation frame must be between 0 and 1, got {t}")));
        }
        self.begin(a, None, Some((b, t)))
    }

    /// [`StableDiffusion::start`] from init images (img2img; several are blended by weight): each is encoded
    /// by the VAE, the latents sampled and mixed, noised to the timestep `req.strength` gives, and denoised
    /// from there, as diffusers' `StableDiffusionImg2ImgPipeline` (its RNG order: the VAE's latent samples
    /// draw first, then the noise). No images is text-to-image.
    pub async fn start_from(&self, req: &Request, init: &[InitImage]) -> Result<Denoiser<'_>> {
        if init.is_empty() {
            return self.start(req);
        }
        let (w, h) = self.validate(req)?;
        let first = self.first_step(req)?;
        let Some(encoder) = &self.vae_encoder else {
            return Err(Error::Invalid("img2img needs the VAE's encoder: load it first (load_vae_encoder)".into()));
        };
        let total: f32 = init.iter().map(|i| i.weight).sum();
        for (n, i) in init.iter().enumerate() {
            if (i.image.width, i.image.height) != (w, h) {
                return Err(Error::Invalid(format!(
                    "init image {} is {}x{} but the generation is {w}x{h}: resize it first",
                    n + 1,
                    i.image.width,
                    i.image.height
                )));
            }
            if !(i.weight.is_finite() && i.weight >= 0.0) {
                return Err(Error::Invalid(format!("init image {}: weight {} is not a number >= 0", n + 1, i.weight)));
            }
        }
        if !(total > 0.0 && total.is_finite()) {
            return Err(Error::Invalid("the init images' weights add up to 0".into()));
        }
        self.check_encoder_limits(encoder, w, h)?;
        let ctx = &self.ctx;
        let act = self.text_encoder_dtype();
        let shape = self.latent_shape(w, h);
        let n: usize = shape.iter().product();
        let mut rng = TorchRng::new(req.seed);
        let mut clean = vec![0f32; n];
        let scale = self.vae_config.scaling_factor as f32;
        for i in init {
            let pixels = Tensor::from_f32_as(ctx, &[1, 3, h, w], &i.image.to_planes(), act)?;
            let moments = encoder.moments(ctx, &pixels)?.to_vec_f32(ctx).await?;
            let (mean, logvar) = moments.split_at(n);
            // latent_dist.sample(generator): mean + std * randn, logvar clamped to [-30, 20] as diffusers does.
            let eps = rng.randn(n);
            let k = i.weight / total;
            for j in 0..n {
                let std = (0.5 * logvar[j].clamp(-30.0, 20.0)).exp();
                clean[j] += k * scale * (mean[j] + std * eps[j]);
            }
        }
        if !clean.iter().all(|v| v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "the VAE encoder produced NaN or infinite values: {}",
                non_finite_hint(act)
            )));
        }
        self.begin(req, Some(Init { clean, rng, first }), None)
    }

    /// The first step an img2img run takes: diffusers' `get_timesteps` (`steps * strength` steps run,
    /// rounded down), refusing a strength that runs none.
    fn first_step(&self, req: &Request) -> Result<usize> {
        let s = req.strength;
        if !(s > 0.0 && s <= 1.0) {
            return Err(Error::Invalid(format!("the denoising strength must be in (0, 1], got {s}")));
        }
        if self.is_lcm() {
            return Err(Error::Invalid(
                "img2img with a latent consistency model (LCM) is not supported yet: use an SD model".into(),
            ));
        }
        let run = ((req.steps as f64 * s as f64) as usize).min(req.steps);
        if run == 0 {
            return Err(Error::Invalid(format!(
                "strength {s} with {} steps runs no denoising step (steps x strength must be at least 1): raise \
                 the strength or the steps",
                req.steps
            )));
        }
        Ok(req.steps - run)
    }

    /// Refuses an init image whose encoding would not fit the device's buffer bindings.
    fn check_encoder_limits(&self, encoder: &Encoder, width: usize, height: usize) -> Result<()> {
        if self.ctx.is_cpu() {
            return Ok(());
        }
        let needed = encoder.largest_activation_bytes(height, width, self.text_encoder_dtype());
        let limit = binding_limit(&self.ctx);
        if needed > limit {
            return Err(Error::Invalid(format!(
                "encoding a {width}x{height} init image needs {:.0} MiB in one GPU buffer, but this device allows \
                 {:.0} MiB (maxStorageBufferBindingSize / maxBufferSize): use a smaller image",
                needed as f64 / (1 << 20) as f64,
                limit as f64 / (1 << 20) as f64
            )));
        }
        Ok(())
    }

    /// Checks a request's size, steps and guidance: the (width, height) it generates.
    fn validate(&self, req: &Request) -> Result<(usize, usize)> {
        let (w, h) = self.size(req)?;
        if req.steps == 0 || req.steps > 1000 {
            return Err(Error::Invalid(format!("steps must be between 1 and 1000, got {}", req.steps)));
        }
        if !(0.0..=MAX_GUIDANCE).contains(&req.guidance) {
            return Err(Error::Invalid(format!(
                "guidance must be between 0 and {MAX_GUIDANCE} (usually 1 to 15), got {}",
                req.guidance
            )));
        }
        self.check_limits(w, h, req.guidance > 1.0 && !self.is_lcm())?;
        Ok((w, h))
    }

    /// Starts from pure noise, from `init` (img2img), and/or partway `toward` another request's noise and
    /// prompts (interpolation).
    fn begin(&self, req: &Request, init: Option<Init>, toward: Option<(&Request, f32)>) -> Result<Denoiser<'_>> {
        let ctx = &self.ctx;
        let (w, h) = self.validate(req)?;
        let scheduler = self.scheduler_kind(req)?.build(&self.scheduler_config, req.steps)?;
        // 1. Conditioning: CFG batches [negative, prompt]; LCM embeds the guidance scale instead.
        let cfg = req.guidance > 1.0 && !self.is_lcm();
        let prompts = |r: &Request| -> Vec<String> {
            if cfg { vec![r.negative_prompt.clone(), r.prompt.clone()] } else { vec![r.prompt.clone()] }
        };
        // Long prompts in chunks: every prompt (both ends of an interpolation too) takes as many as the longest.
        let chunks = |r: &Request| -> Result<Vec<Vec<crate::tokenizer::Chunk>>> {
            prompts(r).iter().map(|p| self.tokenizer.encode_chunks(p, !r.literal_prompt)).collect()
        };
        let chunked = req.long_prompt == LongPrompt::Chunks;
        let most = |r: &Request| -> Result<usize> { Ok(chunks(r)?.iter().map(Vec::len).max().unwrap_or(1)) };
        let n = if chunked { most(req)?.max(toward.map(|(b, _)| most(b)).transpose()?.unwrap_or(1)) } else { 1 };
        let embed = |r: &Request| -> Result<Embedded> {
            let (mut ids, mut weights) = (Vec::new(), Vec::new());
            if chunked {
                for mut c in chunks(r)? {
                    c.resize(n, self.tokenizer.empty_chunk());
                    for (i, w) in c {
                        ids.push(i);
                        weights.extend(w);
                    }
                }
            } else {
                for p in prompts(r) {
                    let (i, w) = if r.literal_prompt {
                        (self.tokenizer.encode(&p)?, Vec::new())
                    } else {
                        self.tokenizer.encode_weighted(&p)?
                    };
                    ids.push(i);
                    weights.extend(w);
                }
            }
            let mut raw = self.text_encoder.forward(ctx, &ids)?;
            if n > 1 {
                // (prompts * chunks, tokens, dim) -> (prompts, chunks * tokens, dim): each prompt's chunks in order.
                let (rows, tokens, dim) = (raw.dim(0), raw.dim(1), raw.dim(2));
                raw = raw.reshape(&[rows / n, n * tokens, dim])?;
            }
            Ok(Embedded { raw, weights: weights.iter().any(|w| *w != 1.0).then_some(weights) })
        };
        // The conditioning, or (with weighted prompts, whose mean is restored on the host) the embeddings to
        // combine at the first step.
        let (context, pending) = match toward {
            None | Some((_, 0.0)) => embed(req)?.into_context(1.0),
            Some((b, 1.0)) => embed(b)?.into_context(1.0),
            Some((b, t)) => {
                let (ea, eb) = (embed(req)?, embed(b)?);
                if ea.weights.is_none() && eb.weights.is_none() {
                    let c = ops::lincomb(ctx, ea.raw.shape(), &[Term::new(1.0 - t, &ea.raw), Term::new(t, &eb.raw)])?;
                    (c, Vec::new())
                } else {
                    (ea.raw.clone(), vec![(ea, 1.0 - t), (eb, t)])
                }
            }
        };
        let act = self.text_encoder_dtype();
        let cond = match self.unet.config.time_cond_proj_dim {
            Some(dim) => Some(guidance_embedding(ctx, req.guidance, 1, dim, act)?),
            None => None,
        };
        // 2. Initial noise from the seed, as torch.randn(generator=manual_seed(seed)) draws it (after the
        //    VAE's samples for img2img), scaled to the first step's noise level.
        let shape = self.latent_shape(w, h);
        let timesteps = scheduler.timesteps().to_vec();
        // The noise of `req`, or of the interpolation toward `b`, and the generator the ancestral noise continues.
        let draw = |rng: Option<TorchRng>| -> Result<(Vec<f32>, TorchRng)> {
            let mut ra = rng.unwrap_or_else(|| TorchRng::new(req.seed));
            let na = noise(req, &shape, &mut ra)?;
            let Some((b, t)) = toward else { return Ok((na, ra)) };
            let mut rb = TorchRng::new(b.seed);
            let nb = noise(b, &shape, &mut rb)?;
            Ok(match t {
                0.0 => (na, ra),
                1.0 => (nb, rb),
                _ => (slerp(t, &na, &nb), ra),
            })
        };
        let (latents, rng, first) = match init {
            None => {
                let (noise, rng) = draw(None)?;
                let noise = Tensor::from_f32_as(ctx, &shape, &noise, act)?;
                (ops::affine(ctx, &noise, scheduler.init_noise_sigma() as f32, 0.0)?, rng, 0)
            }
            Some(Init { clean, rng, first }) => {
                let (noise, rng) = draw(Some(rng))?;
                let (a, b) = scheduler.noising(first);
                let (a, b) = (a as f32, b as f32);
                let noisy: Vec<f32> = clean.iter().zip(&noise).map(|(x, e)| a * x + b * e).collect();
                (Tensor::from_f32_as(ctx, &shape, &noisy, act)?, rng, first)
            }
        };
        Ok(Denoiser {
            sd: self,
            scheduler,
            timesteps,
            first,
            next: first,
            cfg: cfg.then_some(req.guidance),
            context,
            cond,
            shape,
            rng,
            latents,
            prev_x0: None,
            pending,
        })
    }

    /// Refuses, before any work, a size whose UNet activations would not fit one of the device's buffer
    /// bindings (the VAE decodes in tiles; the UNet cannot), naming the limit and what helps.
    pub fn check_limits(&self, width: usize, height: usize, cfg: bool) -> Result<()> {
        if self.ctx.is_cpu() {
            return Ok(());
        }
        let act = self.text_encoder_dtype();
        let (lh, lw) = (height / self.vae_factor(), width / self.vae_factor());
        let elements = self.unet.config.largest_activation(if cfg { 2 } else { 1 }, lh, lw);
        let needed = act.storage_bytes(elements) as u64;
        let limit = binding_limit(&self.ctx);
        if needed > limit {
            let hint = if act == crate::gpu::DType::F32 && self.ctx.has_f16() {
                "f16 activations (--precision f16) halve it, or make a smaller image"
            } else {
                "make a smaller image"
            };
            return Err(Error::Invalid(format!(
                "a {width}x{height} image needs {:.0} MiB in one GPU buffer for the UNet, but this device allows \
                 {:.0} MiB (maxStorageBufferBindingSize / maxBufferSize): {hint}",
                needed as f64 / (1 << 20) as f64,
                limit as f64 / (1 << 20) as f64
            )));
        }
        self.decode_tile(act).map(drop)
    }

    /// The latent's shape for a (width, height) image.
    pub fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        [1, self.unet.config.in_channels, height / self.vae_factor(), width / self.vae_factor()]
    }

    /// The request's initial noise (before scaling by the scheduler's init_noise_sigma), as the loop draws it.
    pub fn initial_noise(&self, req: &Request) -> Result<(Vec<usize>, Vec<f32>)> {
        let (w, h) = self.size(req)?;
        let shape = self.latent_shape(w, h);
        Ok((shape.to_vec(), noise(req, &shape, &mut TorchRng::new(req.seed))?))
    }

    fn text_encoder_dtype(&self) -> crate::gpu::DType {
        self.text_encoder.dtype()
    }

    /// Decodes UNet-space latents to an RGBA image; in overlapping tiles when the whole decode would not fit
    /// the device's buffer limits.
    pub async fn decode(&self, latents: &Tensor) -> Result<Image> {
        let ctx = &self.ctx;
        let z = ops::affine(ctx, latents, (1.0 / self.vae_config.scaling_factor) as f32, 0.0)?;
        let (h, w) = (z.dim(2), z.dim(3));
        if ctx.is_cpu() || self.vae.largest_activation_bytes(h, w, z.dtype()) <= binding_limit(ctx) {
            let image = self.vae.forward(ctx, &z)?;
            let data = image.to_vec_f32(ctx).await?;
            check_image(&data, z.dtype())?;
            return Ok(rgba_from_planes(&data, image.dim(2), image.dim(3)));
        }
        self.decode_tiled(&z).await
    }

    /// The latent tile side a tiled decode uses: the largest that fits the device's limits.
    pub fn decode_tile(&self, act: crate::gpu::DType) -> Result<usize> {
        let limit = binding_limit(&self.ctx);
        self.vae.decode_tile(limit, act).ok_or_else(|| Error::Limit {
            op: "vae decode",
            what: "the VAE decoder's largest activation, even in 8x8-latent tiles",
            needed: self.vae.largest_activation_bytes(8, 8, act),
            limit,
            shape: format!("{act} activations"),
        })
    }

    /// diffusers' `AutoencoderKL.tiled_decode`: latent tiles of side T at a stride of 3/4 T, decoded one at a
    /// time, each blended linearly into its upper and left neighbours over a quarter tile, then cropped.
    async fn decode_tiled(&self, z: &Tensor) -> Result<Image> {
        let ctx = &self.ctx;
        let (c, h, w) = (z.dim(1), z.dim(2), z.dim(3));
        let f = self.vae_factor();
        let t = self.decode_tile(z.dtype())?;
        let (stride, blend, keep) = (t * 3 / 4, t * f / 4, t * f - t * f / 4);
        let latent = z.to_vec_f32(ctx).await?;
        log::info!("decoding {w}x{h} latents in {t}x{t} tiles (the device's buffer limits)");
        // rows[i][j]: (height, width, 3 planes) of the decoded tile.
        let mut rows: Vec<Vec<(usize, usize, Vec<f32>)>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row = Vec::new();
            for j in (0..w).step_by(stride) {
                let (th, tw) = (t.min(h - i), t.min(w - j));
                let mut tile = Vec::with_capacity(c * th * tw);
                for ch in 0..c {
                    for y in i..i + th {
                        tile.extend_from_slice(&latent[(ch * h + y) * w + j..][..tw]);
                    }
                }
                let zt = Tensor::from_f32_as(ctx, &[1, c, th, tw], &tile, z.dtype())?;
                let image = self.vae.forward(ctx, &zt)?;
                row.push((th * f, tw * f, image.to_vec_f32(ctx).await?));
            }
            rows.push(row);
        }
        let (height, width) = (h * f, w * f);
        let mut out = vec![0f32; 3 * height * width];
        let mut y0 = 0;
        for i in 0..rows.len() {
            let mut x0 = 0;
            let mut row_height = 0;
            for j in 0..rows[i].len() {
                let (th, tw) = (rows[i][j].0, rows[i][j].1);
                if i > 0 {
                    let (done, todo) = rows.split_at_mut(i);
                    let (above, here) = (&done[i - 1][j], &mut todo[0][j]);
                    let e = blend.min(above.0).min(th);
                    for p in 0..3 {
                        for y in 0..e {
                            let a = y as f32 / e as f32;
                            for x in 0..tw.min(above.1) {
                                let up = above.2[(p * above.0 + above.0 - e + y) * above.1 + x];
                                let v = &mut here.2[(p * th + y) * tw + x];
                                *v = up * (1.0 - a) + *v * a;
                            }
                        }
                    }
                }
                if j > 0 {
                    let (left, here) = {
                        let (l, r) = rows[i].split_at_mut(j);
                        (&l[j - 1], &mut r[0])
                    };
                    let e = blend.min(left.1).min(tw);
                    for p in 0..3 {
                        for y in 0..th.min(left.0) {
                            for x in 0..e {
                                let a = x as f32 / e as f32;
                                let l = left.2[(p * left.0 + y) * left.1 + left.1 - e + x];
                                let v = &mut here.2[(p * th + y) * tw + x];
                                *v = l * (1.0 - a) + *v * a;
                            }
                        }
                    }
                }
                let tile = &rows[i][j];
                let (kh, kw) = (th.min(keep), tw.min(keep));
                for p in 0..3 {
                    for y in 0..kh {
                        let src = &tile.2[(p * th + y) * tw..][..kw];
                        out[(p * height + y0 + y) * width + x0..][..kw].copy_from_slice(src);
                    }
                }
                x0 += kw;
                row_height = kh;
            }
            y0 += row_height;
        }
        check_image(&out, z.dtype())?;
        Ok(rgba_from_planes(&out, height, width))
    }
}

/// The request's initial noise (before the scheduler's scaling) drawn from `rng` (the seed's, which the
/// ancestral noise then continues), slerped toward the subseed's for a variation.
fn noise(req: &Request, shape: &[usize; 4], rng: &mut TorchRng) -> Result<Vec<f32>> {
    let n: usize = shape.iter().product();
    let base = rng.randn(n);
    let s = req.subseed_strength;
    if !(0.0..=1.0).contains(&s) {
        return Err(Error::Invalid(format!(
            "the variation strength (subseed strength) must be between 0 and 1, got {s}"
        )));
    }
    match req.subseed {
        None if s > 0.0 => Err(Error::Invalid("a variation strength needs a variation seed (subseed)".into())),
        Some(sub) if s > 0.0 => {
            let other = TorchRng::new(sub).randn(n);
            Ok(slerp_noise(s, &base, &other, [shape[1], shape[2], shape[3]]))
        }
        _ => Ok(base),
    }
}

/// The largest guidance scale a request may ask for (diffusers sets none; past a few dozen every model
/// only saturates or overflows).
pub const MAX_GUIDANCE: f32 = 100.0;

/// What usually helps when a model produces NaN or infinite values.
fn non_finite_hint(act: crate::gpu::DType) -> &'static str {
    if act == crate::gpu::DType::F16 {
        "f16 activations can overflow: try f32 (--precision f32; in the page, f32 weights); a damaged weight file \
         does this too"
    } else {
        "the weight file may be damaged (a NaN or an infinity in a tensor)"
    }
}

/// Refuses a decoded image holding NaN or infinite values (instead of writing a black or noisy PNG).
fn check_image(data: &[f32], act: crate::gpu::DType) -> Result<()> {
    if data.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let hint = if act == crate::gpu::DType::F16 {
        "Stable Diffusion VAEs overflow in f16: use f32 activations (--precision f32), or the model's fp16-fix VAE; \
         a damaged weight file does this too"
    } else {
        non_finite_hint(act)
    };
    Err(Error::NonFinite(format!("the VAE decoder produced NaN or infinite values: {hint}")))
}

/// A generation in progress; see [`StableDiffusion::start`].
pub struct Denoiser<'a> {
    sd: &'a StableDiffusion,
    scheduler: Box<dyn schedulers::Scheduler>,
    timesteps: Vec<f64>,
    /// The first step run (img2img skips the noisiest ones).
    first: usize,
    next: usize,
    /// The guidance scale when classifier-free guidance runs.
    cfg: Option<f32>,
    context: Tensor,
    cond: Option<Tensor>,
    shape: [usize; 4],
    rng: TorchRng,
    latents: Tensor,
    prev_x0: Option<Tensor>,
    /// Weighted prompts' embeddings, combined into `context` at the first step (empty otherwise).
    pending: Vec<(Embedded, f32)>,
}

/// A batch of prompt embeddings and, when any token's weight is not 1, the weights (one per token).
struct Embedded {
    raw: Tensor,
    weights: Option<Vec<f32>>,
}

impl Embedded {
    /// The context to use now, and what is left to combine at the first step.
    fn into_context(self, coef: f32) -> (Tensor, Vec<(Embedded, f32)>) {
        match self.weights {
            None => (self.raw, Vec::new()),
            Some(_) => (self.raw.clone(), vec![(self, coef)]),
        }
    }
}

/// The conditioning from weighted embeddings: each scaled per token with its mean restored (A1111's
/// emphasis), then summed with its coefficient (an interpolation's two ends).
async fn weighted_context(ctx: &GpuContext, parts: &[(Embedded, f32)]) -> Result<Tensor> {
    let first = &parts[0].0.raw;
    let &[_, tokens, dim] = first.shape() else {
        return Err(Error::Invalid(format!("text embeddings of shape {:?}", first.shape())));
    };
    let mut sum = vec![0f32; first.numel()];
    for (e, coef) in parts {
        let mut z = e.raw.to_vec_f32(ctx).await?;
        if let Some(w) = &e.weights {
            crate::prompt::apply_weights(&mut z, w, tokens, dim);
        }
        sum.iter_mut().zip(&z).for_each(|(s, v)| *s += coef * v);
    }
    Tensor::from_f32_as(ctx, first.shape(), &sum, first.dtype())
}

impl Drop for Denoiser<'_> {
    /// The generation is over (done, failed or cancelled): the UNet's per-prompt caches go with it.
    fn drop(&mut self) {
        self.sd.unet.release_context();
    }
}

impl Denoiser<'_> {
    /// Runs the next denoising step; None once all are done.
    pub async fn step(&mut self) -> Result<Option<Step<'_>>> {
        let Some(&t) = self.timesteps.get(self.next) else { return Ok(None) };
        if !self.pending.is_empty() {
            self.context = weighted_context(&self.sd.ctx, &std::mem::take(&mut self.pending)).await?;
        }
        let (i, sd, ctx, shape) = (self.next, self.sd, &self.sd.ctx, &self.shape);
        let act = sd.text_encoder_dtype();
        let scaled = ops::affine(ctx, &self.latents, self.scheduler.input_scale(i) as f32, 0.0)?;
        let input = if self.cfg.is_some() { ops::concat(ctx, &scaled, &scaled, 0)? } else { scaled };
        let out = sd.unet.forward(ctx, &input, t as f32, &self.context, self.cond.as_ref())?;
        let guided = match self.cfg {
            Some(g) => ops::lincomb(ctx, shape, &[Term::part(1.0 - g, &out, 0, 2), Term::part(g, &out, 1, 2)])?,
            None => out,
        };
        let plan = self.scheduler.step(i);
        let n: usize = shape.iter().product();
        let noise =
            if plan.needs_noise() { Some(Tensor::from_f32_as(ctx, shape, &self.rng.randn(n), act)?) } else { None };
        let (x0, prev) = apply_plan(ctx, &plan, shape, &self.latents, &guided, self.prev_x0.as_ref(), noise.as_ref())?;
        self.latents = prev;
        self.prev_x0 = Some(x0);
        self.next += 1;
        // One 4-byte readback per step (it is the step's sync point): the text embeddings (first step) and
        // the new latent are checked for NaN and infinity on the GPU.
        let mut check = FiniteCheck::new(ctx)?;
        if i == self.first {
            check.check(ctx, &self.context, 0)?;
        }
        check.check(ctx, &self.latents, 1)?;
        let bad = check.bad_bits(ctx).await?;
        let hint = non_finite_hint(act);
        if bad & 1 != 0 {
            return Err(Error::NonFinite(format!("the text encoder produced NaN or infinite values: {hint}")));
        }
        if bad & 2 != 0 {
            let guidance = self.cfg.map(|g| format!(" at guidance {g}")).unwrap_or_default();
            return Err(Error::NonFinite(format!(
                "the UNet produced NaN or infinite values at step {} of {}{guidance}: {hint}; a lower guidance \
                 helps when the values overflow",
                i + 1 - self.first,
                self.steps()
            )));
        }
        Ok(Some(Step { index: i - self.first, steps: self.steps(), timestep: t, latents: &self.latents }))
    }

    /// The current latent (the final one once every step ran).
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// How many steps this generation runs (fewer than the request's with img2img).
    pub fn steps(&self) -> usize {
        self.timesteps.len() - self.first
    }
}

/// Evaluates a scheduler step on the GPU: x0 first, then the update.
pub fn apply_plan(
    ctx: &GpuContext,
    plan: &StepPlan,
    shape: &[usize],
    sample: &Tensor,
    model_output: &Tensor,
    prev_x0: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let pick = |term: schedulers::Term, x0: Option<&Tensor>| -> Result<Tensor> {
        let t = match term {
            schedulers::Term::Sample => Some(sample),
            schedulers::Term::ModelOutput => Some(model_output),
            schedulers::Term::X0 => x0,
            schedulers::Term::PrevX0 => prev_x0,
            schedulers::Term::Noise => noise,
        };
        t.cloned().ok_or_else(|| Error::Invalid(format!("scheduler step needs {term:?}, which is missing")))
    };
    let combine = |terms: &[(schedulers::Term, f64)], x0: Option<&Tensor>| -> Result<Tensor> {
        // Merge repeated terms (LCM names the sample twice), then one lincomb.
        let mut merged: Vec<(schedulers::Term, f64)> = Vec::new();
        for &(t, c) in terms {
            match merged.iter_mut().find(|(u, _)| *u == t) {
                Some((_, acc)) => *acc += c,
                None => merged.push((t, c)),
            }
        }
        let tensors: Vec<Tensor> = merged.iter().map(|(t, _)| pick(*t, x0)).collect::<Result<_>>()?;
        let lc: Vec<Term<'_>> = tensors.iter().zip(&merged).map(|(t, (_, c))| Term::new(*c as f32, t)).collect();
        ops::lincomb(ctx, shape, &lc)
    };
    let x0 = combine(&plan.x0, None)?;
    let prev = combine(&plan.prev, Some(&x0))?;
    Ok((x0, prev))
}

/// The most bytes one buffer binding may hold on this device.
fn binding_limit(ctx: &GpuContext) -> u64 {
    let s = ctx.summary();
    s.max_storage_buffer_binding_size.min(s.max_buffer_size)
}

/// (batch 1, 3, h, w) in [-1, 1] to RGBA bytes, rounding as diffusers does: round((x / 2 + 0.5).clamp(0, 1) * 255).
pub async fn to_rgba(ctx: &GpuContext, image: &Tensor) -> Result<Image> {
    let &[1, 3, h, w] = image.shape() else {
        return Err(Error::Invalid(format!("expected one RGB image, got {:?}", image.shape())));
    };
    Ok(rgba_from_planes(&image.to_vec_f32(ctx).await?, h, w))
}

/// Three (h, w) planes in [-1, 1] to RGBA bytes, rounded as [`to_rgba`] does.
fn rgba_from_planes(data: &[f32], h: usize, w: usize) -> Image {
    let plane = h * w;
    let mut rgba = vec![255u8; plane * 4];
    for i in 0..plane {
        for c in 0..3 {
            let v = (data[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            rgba[i * 4 + c] = (v * 255.0).round() as u8;
        }
    }
    Image { width: w, height: h, rgba }
}
