//! Textual-inversion embeddings (Gal et al. 2022): new token vectors for the text encoder, triggered by a word.
//! A1111's files (`.safetensors` with `emb_params`, or torch's `.pt` with `string_to_param: {'*': tensor}`,
//! read with candle's pickle reader; the trigger is the file name) and diffusers' `learned_embeds` (one tensor
//! named by its token, `.safetensors` or `.bin`). One or more vectors per embedding.

use std::io::Read;

use candle_core::pickle::{Object, Stack};

use super::{Bytes, Safetensors, TensorSource};
use crate::error::{Error, Result};

/// An embedding: the word that triggers it and its vectors.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The word prompts use (lowercase, as the CLIP tokenizer sees every prompt).
    pub trigger: String,
    /// (vectors, dim), row-major.
    pub values: Vec<f32>,
    pub dim: usize,
}

impl Embedding {
    /// How many token vectors it stands for.
    pub fn vectors(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }

    /// Reads an embedding from a file's bytes; `file_name` gives the trigger of A1111 files (its name without
    /// the extension) and the format (`.pt` / `.bin`: torch's zip pickle; otherwise safetensors).
    pub fn from_bytes(file_name: &str, bytes: Vec<u8>) -> Result<Self> {
        let stem = std::path::Path::new(file_name).file_stem().map(|s| s.to_string_lossy().into_owned());
        let stem = stem.unwrap_or_else(|| file_name.to_string());
        let pickle = bytes.starts_with(b"PK\x03\x04");
        let (trigger, shape, values) =
            if pickle { read_pickle(&bytes, &stem, file_name)? } else { read_safetensors(bytes, &stem, file_name)? };
        let dim = *shape.last().unwrap_or(&0);
        let count: usize = shape.iter().product();
        if shape.is_empty() || shape.len() > 2 || dim == 0 || count == 0 || values.len() != count {
            return Err(Error::Invalid(format!(
                "{file_name}: the embedding has shape {shape:?}; expected (vectors, dim) or (dim)"
            )));
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("{file_name}: the embedding holds {bad}")));
        }
        let trigger = crate::tokenizer::clean(&trigger);
        if trigger.is_empty() || trigger.contains(char::is_whitespace) {
            return Err(Error::Invalid(format!("{file_name}: {trigger:?} cannot be a trigger word")));
        }
        Ok(Self { trigger, values, dim })
    }

    /// Reads an embedding file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(&path.display().to_string(), bytes)
    }

    /// Checks that the vectors fit a text encoder of width `dim` (the error names the family they are for).
    pub fn check_width(&self, dim: usize) -> Result<()> {
        if self.dim == dim {
            return Ok(());
        }
        let family = match self.dim {
            768 => "SD 1.x",
            1024 => "SD 2.x",
            _ => "another model",
        };
        Err(Error::Invalid(format!(
            "the embedding {} has {}-wide vectors (for {family}); this model's text encoder is {dim} wide",
            self.trigger, self.dim
        )))
    }
}

type Parsed = (String, Vec<usize>, Vec<f32>);

fn sdxl(file_name: &str) -> Error {
    Error::Invalid(format!("{file_name} is an SDXL embedding (clip_l and clip_g vectors); this model is not SDXL"))
}

/// A1111's `emb_params`, or diffusers' single tensor named by its token.
fn read_safetensors(bytes: Vec<u8>, stem: &str, file_name: &str) -> Result<Parsed> {
    let file = Safetensors::new(Bytes::Owned(bytes), file_name)?;
    let names = file.names();
    if names.iter().any(|n| n == "clip_g") {
        return Err(sdxl(file_name));
    }
    let (trigger, name) = match names.as_slice() {
        [only] if only == "emb_params" || only == "string_to_param.*" => (stem.to_string(), only.clone()),
        [only] => (only.clone(), only.clone()),
        _ if names.iter().any(|n| n == "emb_params") => (stem.to_string(), "emb_params".to_string()),
        _ => {
            return Err(Error::Invalid(format!(
                "{file_name} is not a textual-inversion embedding: expected emb_params (A1111) or one tensor \
                 named by its token (diffusers), found {} tensors",
                names.len()
            )));
        }
    };
    let t = file.tensor(&name).ok_or_else(|| Error::Invalid(format!("{file_name}: {name} cannot be read")))?;
    Ok((trigger, t.shape.to_vec(), t.to_f32(&name)?))
}

/// torch.save's zip: A1111's {'string_to_param': {'*': tensor}, 'name': ...}, or diffusers' {token: tensor}.
fn read_pickle(bytes: &[u8], stem: &str, file_name: &str) -> Result<Parsed> {
    let bad = |e: String| Error::Invalid(format!("{file_name} is not a readable torch file: {e}"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| bad(e.to_string()))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad("no data.pkl (a legacy, non-zip torch file?)".into()))?;
    let mut stack = Stack::empty();
    {
        let entry = zip.by_name(&pkl).map_err(|e| bad(e.to_string()))?;
        stack.read_loop(&mut std::io::BufReader::new(entry)).map_err(|e| bad(e.to_string()))?;
    }
    let obj = stack.finalize().map_err(|e| bad(e.to_string()))?;
    let dict = |o: Object| o.dict().map_err(|o| bad(format!("expected a dict, found {o:?}")));
    let key = |k: &Object| match k {
        Object::Unicode(s) => Some(s.clone()),
        _ => None,
    };
    let entries = dict(obj)?;
    if entries.iter().any(|(k, _)| key(k).as_deref() == Some("clip_g")) {
        return Err(sdxl(file_name));
    }
    let (trigger, name, tensor) = match entries.iter().position(|(k, _)| key(k).as_deref() == Some("string_to_param")) {
        Some(i) => {
            let inner = dict(entries.into_iter().nth(i).expect("found").1)?;
            let (k, v) = inner.into_iter().next().ok_or_else(|| bad("string_to_param is empty".into()))?;
            (stem.to_string(), k, v)
        }
        None if entries.len() == 1 => {
            let (k, v) = entries.into_iter().next().expect("one entry");
            let token = key(&k).ok_or_else(|| bad("the token is not a string".into()))?;
            (token, k, v)
        }
        None => return Err(bad("neither string_to_param (A1111) nor one token's tensor (diffusers)".into())),
    };
    let dir = std::path::Path::new(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let info = tensor
        .into_tensor_info(name, dir)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("the embedding is not a tensor".into()))?;
    if !info.layout.is_contiguous() {
        return Err(bad("the embedding tensor is not contiguous".into()));
    }
    let mut data = Vec::new();
    zip.by_name(&info.path).map_err(|e| bad(e.to_string()))?.read_to_end(&mut data).map_err(|e| bad(e.to_string()))?;
    let elem = info.dtype.size_in_bytes();
    let shape = info.layout.dims().to_vec();
    let (start, count) = (info.layout.start_offset() * elem, shape.iter().product::<usize>() * elem);
    let raw = data.get(start..start + count).ok_or_else(|| bad(format!("{} holds too few bytes", info.path)))?;
    let values = match info.dtype {
        candle_core::DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(raw),
        candle_core::DType::F16 => {
            bytemuck::pod_collect_to_vec::<u8, half::f16>(raw).iter().map(|v| v.to_f32()).collect()
        }
        candle_core::DType::BF16 => {
            bytemuck::pod_collect_to_vec::<u8, half::bf16>(raw).iter().map(|v| v.to_f32()).collect()
        }
        d => return Err(bad(format!("the embedding is {d:?}, not a float tensor"))),
    };
    Ok((trigger, shape, values))
}
