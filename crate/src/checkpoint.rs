//! Single-file Stable Diffusion checkpoints (one `.safetensors` with the original names, as A1111, ComfyUI and
//! model-sharing sites distribute them, or a stable-diffusion.cpp `.gguf`) as a [`ModelSource`]: the file's tensors under diffusers' names
//! ([`crate::weights::original`]), and the configs a single file does not carry, read off its tensor shapes
//! (SD 1.x or SD 2.x, block widths, layer counts ...) or taken from a diffusers folder (`--config`, as
//! diffusers' `from_single_file(config=...)`). The CLIP BPE vocabulary ships with us.

use std::collections::HashMap;

use serde_json::json;

use crate::error::{Error, Result};
use crate::pipeline::ModelSource;
use crate::tokenizer;
use crate::weights::TensorSource;
use crate::weights::original::{self, Mapping, Part, Remapped};

/// The model families a single file can hold that we run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder, 768-wide cross-attention.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text tower (penultimate layer), 64-wide attention heads; 768x768 v-prediction.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
        }
    }
}

/// The diffusers files a [`Checkpoint`] can make up when neither `--config` nor the file has them.
const DERIVED: [&str; 7] = [
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
];

/// The diffusers paths a [`Checkpoint`] answers with tensors.
const WEIGHT_FILES: [(&str, Part); 3] = [
    ("text_encoder/model.safetensors", Part::TextEncoder),
    ("unet/diffusion_pytorch_model.safetensors", Part::Unet),
    ("vae/diffusion_pytorch_model.safetensors", Part::Vae),
];

/// A single-file checkpoint seen as a diffusers folder.
pub struct Checkpoint {
    file: Box<dyn TensorSource>,
    mapping: Mapping,
    family: Family,
    config: Option<Box<dyn ModelSource>>,
    /// Files a converted GGUF carries in its metadata (`latent_gen.file.*`), used where `config` has none.
    embedded: HashMap<String, String>,
}

impl Checkpoint {
    /// Recognises the checkpoint in `file`; `config` (a diffusers folder) supplies any config, tokenizer or
    /// scheduler file it has, instead of the ones derived from the tensors.
    pub fn new(file: Box<dyn TensorSource>, config: Option<Box<dyn ModelSource>>) -> Result<Self> {
        let names = file.names();
        let label = file.label();
        refuse_foreign(&names, &label)?;
        let mapping = Mapping::new(&names)?;
        // OpenCLIP names, or CLIP names 1024 wide (stable-diffusion.cpp renames OpenCLIP's tower to CLIP's).
        let width = mapping
            .text_encoder
            .get("text_model.embeddings.token_embedding.weight")
            .and_then(|(orig, _)| file.shape(orig))
            .map_or(0, |s| s.get(1).copied().unwrap_or(0));
        let family = if mapping.open_clip || width == 1024 { Family::Sd2 } else { Family::Sd1 };
        if !mapping.unknown.is_empty() {
            let n = mapping.unknown.len();
            let some: Vec<&str> = mapping.unknown.iter().take(5).map(String::as_str).collect();
            log::warn!("{label}: {n} tensors have no diffusers name and are not loaded, e.g. {}", some.join(", "));
        }
        Ok(Self { file, mapping, family, config, embedded: HashMap::new() })
    }

    /// The same with the diffusers files a converted file carries in its metadata
    /// ([`crate::weights::EMBEDDED_FILE`]).
    pub fn with_embedded(mut self, files: HashMap<String, String>) -> Self {
        self.embedded = files;
        self
    }

    /// A file the checkpoint lacks, read off its tensors: configs, the shipped CLIP tokenizer, the scheduler
    /// (one of [`DERIVED`]).
    fn derived(&self, path: &str) -> Option<Result<String>> {
        Some(match path {
            "unet/config.json" => self.unet_config().map(|v| v.to_string()),
            "vae/config.json" => self.vae_config().map(|v| v.to_string()),
            "text_encoder/config.json" => self.clip_config().map(|v| v.to_string()),
            "tokenizer/vocab.json" => Ok(tokenizer::clip_vocab_json(tokenizer::CLIP_MERGES)),
            "tokenizer/merges.txt" => Ok(tokenizer::CLIP_MERGES.into()),
            // SD 2.x's tokenizer pads with "!" (id 0), SD 1.x's with the end token.
            "tokenizer/tokenizer_config.json" => {
                let pad = if self.family == Family::Sd2 { "!" } else { "<|endoftext|>" };
                Ok(json!({ "pad_token": pad }).to_string())
            }
            "scheduler/scheduler_config.json" => Ok(scheduler_config(self.family).to_string()),
            _ => return None,
        })
    }

    /// Opens the `.safetensors` or `.gguf` file at `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path, config: Option<&std::path::Path>) -> Result<Self> {
        let gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let config = config.map(|c| Box::new(crate::pipeline::DirSource(c.to_path_buf())) as Box<dyn ModelSource>);
        if gguf {
            let file = crate::weights::gguf::Gguf::open(path)?;
            let embedded = file.embedded_files();
            return Ok(Self::new(Box::new(file), config)?.with_embedded(embedded));
        }
        let file = crate::weights::Safetensors::open(path)?;
        let embedded = file.embedded_files();
        Ok(Self::new(Box::new(file), config)?.with_embedded(embedded))
    }

    pub fn family(&self) -> Family {
        self.family
    }

    fn view(&self, part: Part) -> Remapped<'_> {
        let what = match part {
            Part::TextEncoder => "text encoder",
            Part::Unet => "UNet",
            Part::Vae => "VAE",
        };
        Remapped {
            file: self.file.as_ref(),
            map: self.mapping.part(part),
            label: format!("{} ({what})", self.file.label()),
        }
    }

    fn shape(&self, part: Part, name: &str) -> Result<Vec<usize>> {
        self.view(part).shape(name).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no tensor for {name} ({} checkpoint layout expected)",
                self.file.label(),
                self.family.name()
            ))
        })
    }

    fn has(&self, part: Part, name: &str) -> bool {
        self.view(part).shape(name).is_some()
    }

    /// How many of `format(i)` exist, for i = 0, 1, ...
    fn count(&self, part: Part, name: impl Fn(usize) -> String) -> usize {
        (0..).take_while(|&i| self.has(part, &name(i))).count()
    }

    fn unet_config(&self) -> Result<serde_json::Value> {
        let u = Part::Unet;
        let levels = self.count(u, |b| format!("down_blocks.{b}.resnets.0.conv1.weight"));
        let channels: Vec<usize> = (0..levels)
            .map(|b| Ok(self.shape(u, &format!("down_blocks.{b}.resnets.0.conv2.weight"))?[0]))
            .collect::<Result<_>>()?;
        let attn_down: Vec<bool> =
            (0..levels).map(|b| self.has(u, &format!("down_blocks.{b}.attentions.0.proj_in.weight"))).collect();
        let attn_up: Vec<bool> =
            (0..levels).map(|b| self.has(u, &format!("up_blocks.{b}.attentions.0.proj_in.weight"))).collect();
        let Some(first) = attn_down.iter().position(|&a| a) else {
            return Err(Error::Invalid(format!("{}: the UNet has no cross-attention", self.file.label())));
        };
        let attn = format!("down_blocks.{first}.attentions.0");
        let proj_in = self.shape(u, &format!("{attn}.proj_in.weight"))?;
        let context = self.shape(u, &format!("{attn}.transformer_blocks.0.attn2.to_k.weight"))?[1];
        let depth = self.count(u, |t| format!("{attn}.transformer_blocks.{t}.norm1.weight"));
        let conv_in = self.shape(u, "conv_in.weight")?;
        let conv_out = self.shape(u, "conv_out.weight")?;
        // Head counts are not in the shapes: SD 1.x has 8 heads everywhere, SD 2.x heads of 64 channels.
        let heads: serde_json::Value = match self.family {
            Family::Sd1 => json!(8),
            Family::Sd2 => json!(channels.iter().map(|c| c / 64).collect::<Vec<_>>()),
        };
        let down: Vec<&str> =
            attn_down.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
        let up: Vec<&str> = attn_up.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
        Ok(json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": conv_in[1],
            "out_channels": conv_out[0],
            "sample_size": if self.family == Family::Sd2 { 96 } else { 64 },
            "block_out_channels": channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.mapping.layout.unet_layers,
            "attention_head_dim": heads,
            "transformer_layers_per_block": depth,
            "cross_attention_dim": context,
            "use_linear_projection": proj_in.len() == 2,
            "upcast_attention": self.family == Family::Sd2,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
        }))
    }

    fn vae_config(&self) -> Result<serde_json::Value> {
        let v = Part::Vae;
        let levels = self.count(v, |i| format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"));
        let channels: Vec<usize> = (0..levels)
            .map(|i| Ok(self.shape(v, &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
            .collect::<Result<_>>()?;
        Ok(json!({
            "_class_name": "AutoencoderKL",
            "in_channels": self.shape(v, "encoder.conv_in.weight")?[1],
            "out_channels": self.shape(v, "decoder.conv_out.weight")?[0],
            "block_out_channels": channels,
            "layers_per_block": self.count(v, |j| format!("encoder.down_blocks.0.resnets.{j}.conv1.weight")),
            "latent_channels": self.shape(v, "decoder.conv_in.weight")?[1],
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
            "use_quant_conv": self.has(v, "quant_conv.weight"),
            "use_post_quant_conv": self.has(v, "post_quant_conv.weight"),
            "mid_block_add_attention": self.has(v, "decoder.mid_block.attentions.0.to_q.weight"),
        }))
    }

    fn clip_config(&self) -> Result<serde_json::Value> {
        let t = Part::TextEncoder;
        let emb = self.shape(t, "text_model.embeddings.token_embedding.weight")?;
        let (vocab, hidden) = (emb[0], emb[1]);
        let layers = self.count(t, |i| format!("text_model.encoder.layers.{i}.layer_norm1.weight"));
        if !hidden.is_multiple_of(64) || layers < 2 {
            return Err(Error::Invalid(format!(
                "{}: a {layers}-layer text encoder of width {hidden} is not CLIP ViT-L or OpenCLIP ViT-H: \
                 give --config with a diffusers folder that has text_encoder/config.json",
                self.file.label()
            )));
        }
        let (act, layers) = match self.family {
            Family::Sd1 => ("quick_gelu", layers),
            // SD 2.x conditions on the penultimate layer: diffusers' config keeps 23 of OpenCLIP's 24.
            Family::Sd2 => ("gelu", layers - 1),
        };
        Ok(json!({
            "architectures": ["CLIPTextModel"],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.shape(t, "text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            "num_hidden_layers": layers,
            "num_attention_heads": hidden / 64,
            "max_position_embeddings": self.shape(t, "text_model.embeddings.position_embedding.weight")?[0],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        }))
    }
}

/// The scheduler both families were trained with (diffusers' configs for SD 1.5 and SD 2.1), run as DDIM.
fn scheduler_config(family: Family) -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": if family == Family::Sd2 { "v_prediction" } else { "epsilon" },
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false,
    })
}

/// An error naming what the checkpoint is when the tensor names say it is not an SD 1.x / 2.x model.
pub fn refuse_foreign(names: &[String], label: &str) -> Result<()> {
    let any = |p: &str| names.iter().any(|n| n.contains(p));
    let starts = |p: &str| names.iter().any(|n| n.starts_with(p));
    let not_ours = |what: &str| Err(Error::Invalid(format!("{label} is {what}, which latent-gen does not run")));
    if starts("conditioner.embedders.") || any("model.diffusion_model.label_emb.") {
        return not_ours("an SDXL checkpoint (conditioner.embedders / label_emb tensors)");
    }
    if any("joint_blocks.") {
        return not_ours("a Stable Diffusion 3 checkpoint (joint_blocks tensors)");
    }
    if any("double_blocks.") && any("single_blocks.") {
        return not_ours("a Flux checkpoint (double_blocks / single_blocks tensors)");
    }
    if starts("lora_unet_") || starts("lora_te") || any(".lora_down.") || any(".lora_A.") {
        return Err(Error::Invalid(format!("{label} is a LoRA, not a whole model: load it with a model")));
    }
    if !starts(original::UNET) {
        let some: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        return Err(Error::Invalid(format!(
            "{label} is not a Stable Diffusion checkpoint: it has no {}* tensors ({} tensors, e.g. {})",
            original::UNET,
            names.len(),
            some.join(", ")
        )));
    }
    if !starts(original::VAE) {
        return Err(Error::Invalid(format!("{label} has no VAE ({}* tensors)", original::VAE)));
    }
    if !starts(original::OPEN_CLIP) && !starts(original::CLIP_L) {
        return Err(Error::Invalid(format!(
            "{label} has no text encoder ({}* or {}* tensors)",
            original::CLIP_L,
            original::OPEN_CLIP
        )));
    }
    Ok(())
}

impl ModelSource for Checkpoint {
    fn text(&self, path: &str) -> Result<String> {
        if let Some(c) = self.config.as_ref().filter(|c| c.exists(path)) {
            return c.text(path);
        }
        if let Some(text) = self.embedded.get(path) {
            return Ok(text.clone());
        }
        self.derived(path).unwrap_or_else(|| Err(Error::Invalid(format!("the checkpoint has no {path}"))))
    }

    fn exists(&self, path: &str) -> bool {
        WEIGHT_FILES.iter().any(|(p, _)| *p == path)
            || self.embedded.contains_key(path)
            || DERIVED.contains(&path)
            || self.config.as_ref().is_some_and(|c| c.exists(path))
    }

    fn tensors(&self, path: &str) -> Result<Box<dyn TensorSource + '_>> {
        let (_, part) = WEIGHT_FILES
            .iter()
            .find(|(p, _)| *p == path)
            .ok_or_else(|| Error::Invalid(format!("the checkpoint has no {path}")))?;
        Ok(Box::new(self.view(*part)))
    }
}
