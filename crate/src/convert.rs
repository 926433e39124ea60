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
use crate::weights::{HostDType, HostTensor, SafetensorsPlan, TensorSource, UPLOAD_CHUNK, safetensors_header};
use safetensors::Dtype;
use std::borrow::Cow;

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

/// A conversion laid out before any data is read: the file's header, then its tensors in order, each
/// written by [`Conversion::write_tensor`] in row blocks of about [`UPLOAD_CHUNK`] bytes, so memory holds one
/// block of one tensor. [`convert`] runs all of it; the page runs it a few tensors at a time, so it can report
/// progress and stop between them.
pub struct Conversion {
    format: Format,
    /// The weight files of the text encoder, UNet and VAE.
    parts: Vec<String>,
    /// (part index, diffusers name) per tensor written, in the order written.
    plan: Vec<(usize, String)>,
    tensors: Vec<TensorPlan>,
    metadata: Vec<(String, String)>,
    report: Report,
    /// Rows are read and converted in blocks of about this many stored bytes.
    block: usize,
}

impl Conversion {
    /// Plans writing `src` in `format` with linear weights in `weights` (q8_0, q4_0 or f16; safetensors:
    /// f16), and with `flat_convs` convolutions quantized too (see [`target`]).
    pub fn new(src: &dyn ModelSource, format: Format, weights: DType, flat_convs: bool) -> Result<Self> {
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
        let mut plan = Vec::new();
        let mut tensors: Vec<TensorPlan> = Vec::new();
        let mut report = Report::default();
        for (i, (part, path)) in parts.iter().enumerate() {
            let s = src.tensors(path)?;
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
                plan.push((i, d));
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
        report.tensors = tensors.len();
        for t in &tensors {
            let name = format!("{:?}", t.dtype).to_uppercase();
            match report.dtypes.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => report.dtypes.push((name, 1)),
            }
        }
        let parts = parts.into_iter().map(|(_, p)| p).collect();
        let mut c = Conversion { format, parts, plan, tensors, metadata, report, block: UPLOAD_CHUNK };
        c.report.bytes = c.header()?.len() as u64 + (0..c.len()).map(|k| c.stored(k) as u64).sum::<u64>();
        Ok(c)
    }

    /// Reads and converts rows in blocks of about `bytes` (default [`UPLOAD_CHUNK`]; at least one row).
    pub fn block_bytes(mut self, bytes: usize) -> Self {
        self.block = bytes;
        self
    }

    /// Tensors to write.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// What the finished file holds (its size in `bytes`).
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The file's first bytes.
    pub fn header(&self) -> Result<Vec<u8>> {
        match self.format {
            Format::Gguf => gguf::header(&self.metadata, &self.tensors),
            Format::Safetensors => {
                let metadata: std::collections::HashMap<String, String> =
                    [("format".to_string(), "pt".to_string())].into_iter().chain(self.metadata.clone()).collect();
                safetensors_header(&metadata, &self.safetensors_plans())
            }
        }
    }

    fn safetensors_plans(&self) -> Vec<SafetensorsPlan> {
        self.tensors
            .iter()
            .map(|t| SafetensorsPlan {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: if t.dtype == GgmlDType::F32 { Dtype::F32 } else { Dtype::F16 },
            })
            .collect()
    }

    /// Bytes tensor `k` takes in the file, with its padding.
    fn stored(&self, k: usize) -> usize {
        let n = self.tensors[k].bytes();
        match self.format {
            Format::Gguf => n.div_ceil(gguf::ALIGNMENT) * gguf::ALIGNMENT,
            Format::Safetensors => n,
        }
    }

    /// The source's weight files, opened for [`Conversion::write_tensor`].
    pub fn open<'a>(&self, src: &'a dyn ModelSource) -> Result<Vec<Box<dyn TensorSource + 'a>>> {
        self.parts.iter().map(|p| src.tensors(p)).collect()
    }

    /// Writes tensor `k` (after the header and tensors `..k`) through `sink`, in row blocks. Returns the
    /// bytes written.
    pub fn write_tensor(
        &self,
        sources: &[Box<dyn TensorSource + '_>],
        k: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<usize> {
        let (i, d) = &self.plan[k];
        let (s, t) = (&sources[*i], &self.tensors[k]);
        let unreadable = || Error::Invalid(format!("{d} could not be read from {}", s.label()));
        let (shape, host_dtype) = s.shape(d).zip(s.dtype(d)).ok_or_else(unreadable)?;
        let numel: usize = shape.iter().product();
        let stored = host_dtype.bytes(numel).ok_or_else(unreadable)?;
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        let row_stored = stored / rows.max(1);
        let per = (self.block / row_stored.max(1)).max(1);
        let mut written = 0;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + per).min(rows);
            let data = s
                .tensor_bytes(d, r0 * row_stored..r1 * row_stored)
                .map_err(|e| Error::Invalid(format!("rows {r0}..{r1} of {d} from {}: {e}", s.label())))?;
            let block_shape = if shape.len() >= 2 { [&[r1 - r0], &shape[1..]].concat() } else { shape.clone() };
            let host = HostTensor { dtype: host_dtype, shape: Cow::Owned(block_shape), data };
            let bytes = encode(&host, t.dtype, d)?;
            written += bytes.len();
            sink(&bytes)?;
            r0 = r1;
        }
        if written != t.bytes() {
            return Err(Error::Invalid(format!("{d}: {written} bytes of data for {} in {:?}", t.bytes(), t.dtype)));
        }
        let pad = self.stored(k) - written;
        if pad > 0 {
            sink(&vec![0; pad])?;
        }
        Ok(written + pad)
    }
}

/// A block of whole rows, stored as `host`, in GGML type `to`.
fn encode(host: &HostTensor, to: GgmlDType, name: &str) -> Result<Vec<u8>> {
    Ok(match to {
        GgmlDType::F16 if host.dtype == HostDType::F16 => host.data.to_vec(),
        GgmlDType::F16 => {
            let v: Vec<half::f16> = host.to_f32(name)?.into_iter().map(half::f16::from_f32).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        GgmlDType::F32 if host.dtype == HostDType::F32 => host.data.to_vec(),
        GgmlDType::F32 => bytemuck::cast_slice(&host.to_f32(name)?).to_vec(),
        GgmlDType::Q8_0 => quant::quantize_ggml(DType::Q8_0, &host.to_f32(name)?)?,
        GgmlDType::Q4_0 => quant::quantize_ggml(DType::Q4_0, &host.to_f32(name)?)?,
        other => return Err(Error::Invalid(format!("{name}: cannot write {other:?}"))),
    })
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
    let c = Conversion::new(src, format, weights, flat_convs)?;
    let io = |e: std::io::Error| Error::Invalid(format!("writing the {format:?} file: {e}"));
    out.write_all(&c.header()?).map_err(io)?;
    let sources = c.open(src)?;
    for k in 0..c.len() {
        c.write_tensor(&sources, k, &mut |b| out.write_all(b).map_err(io))?;
        progress(k + 1, c.len());
    }
    Ok(c.report)
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
