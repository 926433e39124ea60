//! `latent-gen convert`: any model we load (diffusers folder, single file, GGUF) written as one GGUF file in
//! stable-diffusion.cpp's layout and names (or as a single-file `.safetensors` checkpoint with the same names): the original SD tensor names (CLIP names under
//! `cond_stage_model.transformer.`, as sd.cpp keeps them for SD 1.x and 2.x), matrices whose rows are whole
//! blocks of 32 quantized, other matrices f16, vectors f32. Our configs, scheduler, preview factors (and a
//! tokenizer that differs from CLIP's) go into the metadata, so the file alone is a whole model for us.
//! Tensors are converted and written one at a time.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};
use crate::gpu::{DType, quant};
use crate::models::parse_config;
use crate::models::unet_2d::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::pipeline::{ModelSource, weights_file};
use crate::weights::gguf::{self, EMBEDDED_FILE, TensorPlan};
use crate::weights::original::{Layout, Op, Part, original_name};
use crate::weights::{HostDType, SafetensorsPlan, TensorSource, write_safetensors};
use safetensors::Dtype;

/// The diffusers files a converted model carries in its metadata (when the source has them).
const EMBEDDED: [&str; 8] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "preview.json",
];

/// What a conversion wrote.
#[derive(Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors per block type, e.g. ("Q4_0", 300).
    pub dtypes: Vec<(String, usize)>,
    /// Source tensors left out (integer buffers such as position_ids), by name.
    pub skipped: Vec<String>,
}

/// The block type a tensor of `shape` gets when the model is converted to `weights` (q8_0, q4_0 or f16),
/// and the shape it is stored in: with `flat_convs`, a convolution whose (in * kh * kw) rows are whole blocks
/// is quantized as that (out, in * kh * kw) matrix (our kernels read it so; stable-diffusion.cpp keeps
/// convolutions in f16, GGML's blocks running along kw).
pub fn target(weights: DType, shape: &[usize], flat_convs: bool) -> (GgmlDType, Vec<usize>) {
    if flat_convs && shape.len() == 4 && weights.is_quantized() {
        let row: usize = shape[1..].iter().product();
        if row.is_multiple_of(32) {
            return (target_dtype(weights, &[shape[0], row]), vec![shape[0], row]);
        }
    }
    (target_dtype(weights, shape), shape.to_vec())
}

/// The block type a tensor of `shape` gets when the model is converted to `weights` (q8_0, q4_0 or f16).
pub fn target_dtype(weights: DType, shape: &[usize]) -> GgmlDType {
    let quantized = match weights {
        DType::Q8_0 => Some(GgmlDType::Q8_0),
        DType::Q4_0 => Some(GgmlDType::Q4_0),
        _ => None,
    };
    match (shape.len(), quantized) {
        (0 | 1, _) => GgmlDType::F32,
        (_, Some(q)) if shape.last().is_some_and(|d| d % 32 == 0) => q,
        _ => GgmlDType::F16,
    }
}

/// The UNet / VAE block layout a diffusers model's configs describe.
fn layout(src: &dyn ModelSource) -> Result<Layout> {
    let unet: UNetConfig = parse_config(&src.text("unet/config.json")?, "unet")?;
    let vae: VaeConfig = parse_config(&src.text("vae/config.json")?, "vae")?;
    let levels = unet.block_out_channels.len();
    let layers = unet.layers_per_block.expand(levels, "layers_per_block")?;
    if layers.iter().any(|&l| l != layers[0]) {
        return Err(Error::Invalid(format!(
            "a UNet with layers_per_block {layers:?} has no Stable Diffusion checkpoint layout"
        )));
    }
    Ok(Layout {
        unet_levels: levels,
        unet_layers: layers[0],
        up_attention: unet.up_block_types.iter().map(|t| t.contains("CrossAttn")).collect(),
        vae_levels: vae.block_out_channels.len(),
        vae_layers: vae.layers_per_block,
    })
}

/// The file a conversion writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// stable-diffusion.cpp's GGUF.
    Gguf,
    /// A single-file checkpoint as A1111 and ComfyUI read it (f16 matrices, f32 vectors).
    Safetensors,
}

impl Format {
    /// The format a file name asks for.
    pub fn from_path(path: &std::path::Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("gguf") => Ok(Format::Gguf),
            Some("safetensors") => Ok(Format::Safetensors),
            _ => Err(Error::Invalid(format!("{}: write a .gguf or a .safetensors file", path.display()))),
        }
    }
}

/// Writes `src` in `format` with linear weights in `weights` (q8_0, q4_0 or f16; safetensors: f16), and
/// with `flat_convs` convolutions quantized too (see [`target`]). `progress(done, total)` runs after each
/// tensor.
pub fn convert(
    src: &dyn ModelSource,
    format: Format,
    weights: DType,
    flat_convs: bool,
    out: &mut impl std::io::Write,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    if weights == DType::F32 || (format == Format::Safetensors && weights != DType::F16) {
        let allowed = if format == Format::Gguf { "q8_0, q4_0 or f16" } else { "f16" };
        return Err(Error::Invalid(format!("{format:?} files are written with {allowed} weights")));
    }
    let layout = layout(src)?;
    let parts = [
        (Part::TextEncoder, weights_file(src, "text_encoder", "model")?),
        (Part::Unet, weights_file(src, "unet", "diffusion_pytorch_model")?),
        (Part::Vae, weights_file(src, "vae", "diffusion_pytorch_model")?),
    ];
    let sources: Vec<Box<dyn TensorSource + '_>> =
        parts.iter().map(|(_, path)| src.tensors(path)).collect::<Result<_>>()?;
    // (source index, diffusers name, reshape) per tensor written, in the order written.
    let mut plan: Vec<(usize, String, Op)> = Vec::new();
    let mut tensors: Vec<TensorPlan> = Vec::new();
    let mut report = Report::default();
    for (i, ((part, _), s)) in parts.iter().zip(&sources).enumerate() {
        let mut names = s.names();
        names.sort();
        for d in names {
            // Shapes and dtypes from the header: the data is read once, when it is written.
            let (Some(found), Some(dtype)) = (s.shape(&d), s.dtype(&d)) else { continue };
            if matches!(dtype, HostDType::Other(_)) {
                report.skipped.push(d);
                continue;
            }
            let (name, op) = original_name(*part, &layout, &d).ok_or_else(|| {
                Error::Invalid(format!("{}: {d} has no name in a Stable Diffusion checkpoint", s.label()))
            })?;
            let shape = match op {
                Op::Unsqueeze => [found.as_slice(), &[1, 1]].concat(),
                _ => found,
            };
            let flat = format == Format::Gguf && flat_convs;
            let (dtype, shape) = target(weights, &shape, flat);
            tensors.push(TensorPlan { name, dtype, shape });
            plan.push((i, d, op));
        }
    }
    let mut metadata = vec![("general.architecture".to_string(), "stable-diffusion".to_string())];
    metadata.push(("latent_gen.version".into(), env!("CARGO_PKG_VERSION").into()));
    for path in EMBEDDED {
        if src.exists(path) {
            metadata.push((format!("{EMBEDDED_FILE}{path}"), src.text(path)?));
        }
    }
    embed_tokenizer(src, &mut metadata)?;
    let total = tensors.len();
    let mut tensor_data = |k: usize| -> Result<Vec<u8>> {
        let (i, d, _) = &plan[k];
        let t = &tensors[k];
        let host = sources[*i].tensor(d).ok_or_else(|| Error::Invalid(format!("{d} could not be read")))?;
        let bytes = match t.dtype {
            GgmlDType::F16 if host.dtype == HostDType::F16 => host.data.into_owned(),
            GgmlDType::F16 => {
                let v: Vec<half::f16> = host.to_f32(d)?.into_iter().map(half::f16::from_f32).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            GgmlDType::F32 => bytemuck::cast_slice(&host.to_f32(d)?).to_vec(),
            GgmlDType::Q8_0 => quant::quantize_ggml(DType::Q8_0, &host.to_f32(d)?)?,
            GgmlDType::Q4_0 => quant::quantize_ggml(DType::Q4_0, &host.to_f32(d)?)?,
            other => return Err(Error::Invalid(format!("{d}: cannot write {other:?}"))),
        };
        progress(k + 1, total);
        Ok(bytes)
    };
    report.bytes = match format {
        Format::Gguf => gguf::write(out, &metadata, &tensors, tensor_data)?,
        Format::Safetensors => {
            let plans: Vec<SafetensorsPlan> = tensors
                .iter()
                .map(|t| SafetensorsPlan {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: if t.dtype == GgmlDType::F32 { Dtype::F32 } else { Dtype::F16 },
                })
                .collect();
            let metadata: std::collections::HashMap<String, String> =
                [("format".to_string(), "pt".to_string())].into_iter().chain(metadata).collect();
            write_safetensors(out, &metadata, &plans, &mut tensor_data)?
        }
    };
    report.tensors = total;
    for t in &tensors {
        let name = format!("{:?}", t.dtype).to_uppercase();
        match report.dtypes.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => report.dtypes.push((name, 1)),
        }
    }
    Ok(report)
}

/// Embeds the tokenizer's vocabulary and merges when they differ from the CLIP ones we ship.
fn embed_tokenizer(src: &dyn ModelSource, metadata: &mut Vec<(String, String)>) -> Result<()> {
    let (Ok(vocab), Ok(merges)) = (src.text("tokenizer/vocab.json"), src.text("tokenizer/merges.txt")) else {
        return Ok(());
    };
    let ours = crate::tokenizer::CLIP_MERGES;
    let same_merges = merges.lines().filter(|l| !l.trim().is_empty()).eq(ours.lines().filter(|l| !l.trim().is_empty()));
    let parse = |t: &str| serde_json::from_str::<std::collections::HashMap<String, u32>>(t).ok();
    let same_vocab = parse(&vocab).is_some_and(|v| Some(v) == parse(&crate::tokenizer::clip_vocab_json(ours)));
    if !(same_merges && same_vocab) {
        metadata.push((format!("{EMBEDDED_FILE}tokenizer/vocab.json"), vocab));
        metadata.push((format!("{EMBEDDED_FILE}tokenizer/merges.txt"), merges));
    }
    Ok(())
}
