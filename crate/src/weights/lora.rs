//! LoRA files (low-rank adaptation, Hu et al. 2021): kohya / A1111 (`lora_unet_*`, `lora_te_*` / `lora_te1_*`
//! with `lora_down`, `lora_up` and `alpha`, LoCon convolutions included) and diffusers / PEFT (`unet.*` and
//! `text_encoder.*` with `lora_A` / `lora_B`, alphas from the `lora_adapter_metadata` that `save_lora_weights`
//! writes). Each layer is matched to the weight it updates by the model's own tensor names: diffusers names
//! directly, the original SD (ldm) names through [`super::original`]'s table. [`super::Weights`] merges the
//! matches as they load: W + scale * alpha / rank * up @ down, as diffusers' `fuse_lora` does.

use std::collections::{BTreeMap, HashMap};

use super::original::{Layout, Part, UNET, original_name};
use super::{Patch, TensorSource, Update};
use crate::error::{Error, Result};

/// How a file names its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya's sd-scripts and A1111: `lora_unet_down_blocks_0_..._to_q.lora_down.weight`.
    Kohya,
    /// diffusers / PEFT: `unet.down_blocks.0....to_q.lora_A.weight`.
    Peft,
}

/// One low-rank layer of a file: the update up (out, rank) @ down (rank, in * kh * kw), times `scaling`.
#[derive(Clone, Debug)]
pub struct LoraLayer {
    /// The network it updates (text encoder or UNet).
    pub part: Part,
    /// The layer's name as the file writes it, after the network's prefix (underscores for kohya, dots for
    /// PEFT), without the text encoder's `text_model` prefix.
    pub module: String,
    /// The tensors holding the factors.
    pub down: String,
    pub up: String,
    /// (rank, in[, kh, kw]) and (out, rank[, 1, 1]).
    pub down_shape: Vec<usize>,
    pub up_shape: Vec<usize>,
    /// alpha / rank (alpha / sqrt(rank) for rsLoRA): the factor before the user's scale.
    pub scaling: f32,
}

impl LoraLayer {
    fn rank(&self) -> usize {
        self.down_shape[0]
    }
}

/// A LoRA file, parsed: its layers and the keys no rule reads.
pub struct Lora {
    /// What prompts call it (`<lora:NAME:0.8>`): the file name without its extension.
    pub name: String,
    pub format: LoraFormat,
    pub layers: Vec<LoraLayer>,
    /// Tensors that are not part of a layer we apply (listed in a warning when the LoRA is used).
    pub unknown: Vec<String>,
    src: Box<dyn TensorSource>,
}

/// What a LoRA for an architecture we do not run looks like.
fn foreign_architecture(names: &[String]) -> Option<&'static str> {
    let any = |f: &dyn Fn(&str) -> bool| names.iter().any(|n| f(n));
    if any(&|n| {
        n.starts_with("lora_te2_")
            || n.starts_with("text_encoder_2.")
            || n.contains("label_emb")
            || n.contains("add_embedding")
    }) {
        return Some("SDXL (it has a second text encoder)");
    }
    if any(&|n| n.contains("double_blocks") || n.contains("single_blocks") || n.contains("single_transformer_blocks")) {
        return Some("Flux");
    }
    if any(&|n| n.starts_with("transformer.") || n.starts_with("lora_transformer_")) {
        return Some("a transformer (DiT) model such as SD3");
    }
    None
}

/// Whether the file holds LyCORIS's Hadamard or Kronecker products (LoHa, LoKr), which are not low-rank pairs.
fn lycoris(names: &[String]) -> bool {
    names.iter().any(|n| n.contains("hada_w") || n.contains("lokr_w"))
}

/// The network a kohya layer name belongs to, and the rest of its name.
fn kohya_part(module: &str) -> Option<(Part, &str)> {
    if let Some(rest) = module.strip_prefix("lora_unet_") {
        return Some((Part::Unet, rest));
    }
    let rest = module.strip_prefix("lora_te_").or_else(|| module.strip_prefix("lora_te1_"))?;
    Some((Part::TextEncoder, rest.strip_prefix("text_model_").unwrap_or(rest)))
}

/// The network a PEFT layer name belongs to, and the rest of its name.
fn peft_part(module: &str) -> Option<(Part, &str)> {
    if let Some(rest) = module.strip_prefix("unet.") {
        return Some((Part::Unet, rest));
    }
    let rest = module.strip_prefix("text_encoder.")?;
    Some((Part::TextEncoder, rest.strip_prefix("text_model.").unwrap_or(rest)))
}

/// A scalar tensor's value (kohya's alphas: f32, f16 or bf16, shape [] or [1]).
fn scalar(src: &dyn TensorSource, name: &str) -> Result<f32> {
    let t = src.tensor(name).ok_or_else(|| Error::Invalid(format!("{}: {name} cannot be read", src.label())))?;
    match t.to_f32(name)?.as_slice() {
        [v] if v.is_finite() => Ok(*v),
        v => Err(Error::Invalid(format!("{}: {name} should be one number, found {v:?}", src.label()))),
    }
}

/// The settings PEFT saved for one network (`lora_adapter_metadata`, keys `unet.r`, `unet.lora_alpha`, ...).
#[derive(Default)]
struct PeftConfig {
    alpha: Option<f32>,
    alpha_pattern: Vec<(String, f32)>,
    rslora: bool,
}

impl PeftConfig {
    fn parse(metadata: Option<&str>, prefix: &str, label: &str) -> Result<Self> {
        let Some(text) = metadata else { return Ok(Self::default()) };
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("{label}: lora_adapter_metadata is not a JSON object: {e}")))?;
        let get = |key: &str| json.get(&format!("{prefix}.{key}"));
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::Invalid(format!("{label} is a DoRA (weight-decomposed LoRA), which is not supported")));
        }
        let alpha_pattern = match get("alpha_pattern") {
            Some(serde_json::Value::Object(m)) => {
                m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect()
            }
            _ => Vec::new(),
        };
        Ok(Self {
            alpha: get("lora_alpha").and_then(|v| v.as_f64()).map(|v| v as f32),
            alpha_pattern,
            rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        })
    }

    /// The alpha of `module`: PEFT's pattern keys match the module's name or its end after a dot.
    fn alpha_for(&self, module: &str) -> Option<f32> {
        let matches = |k: &str| module == k || module.ends_with(&format!(".{k}"));
        self.alpha_pattern.iter().find(|(k, _)| matches(k)).map(|(_, a)| *a).or(self.alpha)
    }
}

impl Lora {
    /// Parses a LoRA from its tensors. `adapter_metadata` is the safetensors metadata's `lora_adapter_metadata`
    /// (PEFT files: the alphas); `name` is what prompts call it. Files for other architectures, DoRA and
    /// LyCORIS variants we cannot merge, and files with no LoRA layers are errors that say which.
    pub fn new(name: impl Into<String>, src: Box<dyn TensorSource>, adapter_metadata: Option<&str>) -> Result<Self> {
        let name = name.into();
        let label = src.label();
        let mut names = src.names();
        names.sort();
        if let Some(arch) = foreign_architecture(&names) {
            return Err(Error::Invalid(format!(
                "{label} is a LoRA for {arch}; latent-gen runs Stable Diffusion 1.x and 2.x models"
            )));
        }
        if names.iter().any(|n| n.contains("dora_scale") || n.contains("lora_magnitude_vector")) {
            return Err(Error::Invalid(format!("{label} is a DoRA (weight-decomposed LoRA), which is not supported")));
        }
        if let Some(n) = names.iter().find(|n| n.contains(".lora_mid.")) {
            return Err(Error::Invalid(format!(
                "{label} has Tucker-decomposed layers ({n}, LyCORIS's LoCon with lora_mid), which are not supported"
            )));
        }
        let kohya = names.iter().any(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te"));
        let peft = names.iter().any(|n| n.contains(".lora_A.") || n.contains(".lora_B."));
        let (format, layers, unknown) = match (kohya, peft) {
            (true, _) => (LoraFormat::Kohya, Vec::new(), Vec::new()),
            (false, true) => (LoraFormat::Peft, Vec::new(), Vec::new()),
            (false, false) => {
                return Err(Error::Invalid(if lycoris(&names) {
                    format!("{label} is a LyCORIS LoHa/LoKr file, which is not supported (only LoRA and LoCon)")
                } else {
                    format!(
                        "{label} is not a LoRA: no lora_down/lora_up (kohya, A1111) or lora_A/lora_B (diffusers, \
                         PEFT) tensors among its {} tensors",
                        names.len()
                    )
                }));
            }
        };
        let mut lora = Lora { name, format, layers, unknown, src };
        match format {
            LoraFormat::Kohya => lora.read_kohya(&names)?,
            LoraFormat::Peft => lora.read_peft(&names, adapter_metadata)?,
        }
        if lora.layers.is_empty() {
            return Err(Error::Invalid(if lycoris(&names) {
                format!("{label} is a LyCORIS LoHa/LoKr file, which is not supported (only LoRA and LoCon)")
            } else {
                format!("{label} has no LoRA layers for a text encoder or a UNet")
            }));
        }
        Ok(lora)
    }

    /// Opens a `.safetensors` LoRA file; its name is the file name without the extension.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let file = super::Safetensors::open(path)?;
        let metadata = file.metadata_value(ADAPTER_METADATA);
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::new(name, Box::new(file), metadata.as_deref())
    }

    /// A LoRA from a safetensors file's bytes.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        let name = name.into();
        let file = super::Safetensors::new(super::Bytes::Owned(bytes), format!("the LoRA {name}"))?;
        let metadata = file.metadata_value(ADAPTER_METADATA);
        Self::new(name, Box::new(file), metadata.as_deref())
    }

    /// Where the file is (for messages).
    pub fn label(&self) -> String {
        self.src.label()
    }

    fn bad(&self, what: String) -> Error {
        Error::Invalid(format!("{}: {what}", self.src.label()))
    }

    /// A layer from its two tensors, checked: 2-D or 4-D, equal ranks, a 1x1 up.
    fn layer(
        &self,
        part: Part,
        module: &str,
        down: String,
        up: String,
        alpha: Option<f32>,
        rs: bool,
    ) -> Result<LoraLayer> {
        let shape = |n: &str| self.src.shape(n).ok_or_else(|| self.bad(format!("{n} cannot be read")));
        let (down_shape, up_shape) = (shape(&down)?, shape(&up)?);
        let ok_rank = |s: &[usize]| matches!(s.len(), 2 | 4) && s.iter().all(|&d| d > 0);
        if !ok_rank(&down_shape) || !ok_rank(&up_shape) || up_shape[2..].iter().any(|&d| d != 1) {
            return Err(self.bad(format!(
                "layer {module} has factors {down_shape:?} and {up_shape:?}, not (rank, in[, kh, kw]) and \
                 (out, rank[, 1, 1])"
            )));
        }
        if down_shape[0] != up_shape[1] {
            return Err(self.bad(format!(
                "rank mismatch in layer {module}: {down} has rank {} but {up} has rank {}",
                down_shape[0], up_shape[1]
            )));
        }
        let rank = down_shape[0] as f32;
        let alpha = alpha.unwrap_or(rank);
        let scaling = if rs { alpha / rank.sqrt() } else { alpha / rank };
        Ok(LoraLayer { part, module: module.to_string(), down, up, down_shape, up_shape, scaling })
    }

    /// kohya: `{module}.lora_down.weight`, `{module}.lora_up.weight`, optional `{module}.alpha`.
    fn read_kohya(&mut self, names: &[String]) -> Result<()> {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for n in names {
            match n.split_once('.') {
                Some((m, rest)) if kohya_part(m).is_some() => groups.entry(m).or_default().push(rest),
                _ => self.unknown.push(n.clone()),
            }
        }
        for (module, rests) in groups {
            let (part, short) = kohya_part(module).expect("grouped by kohya_part");
            let has = |r: &str| rests.contains(&r);
            for r in rests.iter().filter(|r| !["lora_down.weight", "lora_up.weight", "alpha"].contains(r)) {
                self.unknown.push(format!("{module}.{r}"));
            }
            match (has("lora_down.weight"), has("lora_up.weight")) {
                (true, true) => {}
                (false, false) => continue,
                (d, _) => {
                    let (present, missing) = if d { ("lora_down", "lora_up") } else { ("lora_up", "lora_down") };
                    return Err(self.bad(format!("layer {module} has a {present} but no {missing}: a damaged file?")));
                }
            }
            let alpha = if has("alpha") { Some(scalar(self.src.as_ref(), &format!("{module}.alpha"))?) } else { None };
            let layer = self.layer(
                part,
                short,
                format!("{module}.lora_down.weight"),
                format!("{module}.lora_up.weight"),
                alpha,
                false,
            )?;
            self.layers.push(layer);
        }
        Ok(())
    }

    /// PEFT: `{part}.{module}.lora_A.weight`, `{part}.{module}.lora_B.weight`; alphas from the metadata (or
    /// `{part}.{module}.alpha`), else alpha = rank, as diffusers loads such files.
    fn read_peft(&mut self, names: &[String], metadata: Option<&str>) -> Result<()> {
        let label = self.src.label();
        let configs = [
            (Part::Unet, PeftConfig::parse(metadata, "unet", &label)?),
            (Part::TextEncoder, PeftConfig::parse(metadata, "text_encoder", &label)?),
        ];
        let mut modules: BTreeMap<&str, ()> = BTreeMap::new();
        for n in names {
            let module = n.strip_suffix(".lora_A.weight").or_else(|| n.strip_suffix(".lora_B.weight"));
            match module.filter(|m| peft_part(m).is_some()) {
                Some(m) => {
                    modules.insert(m, ());
                }
                None if n.ends_with(".alpha") && names.contains(&format!("{}.lora_A.weight", &n[..n.len() - 6])) => {}
                None => self.unknown.push(n.clone()),
            }
        }
        for module in modules.into_keys() {
            let (part, short) = peft_part(module).expect("filtered by peft_part");
            let (down, up) = (format!("{module}.lora_A.weight"), format!("{module}.lora_B.weight"));
            if !names.contains(&down) || !names.contains(&up) {
                return Err(self.bad(format!("layer {module} lacks its lora_A or lora_B: a damaged file?")));
            }
            let config = &configs.iter().find(|(p, _)| *p == part).expect("both parts").1;
            let alpha_key = format!("{module}.alpha");
            let alpha = if names.contains(&alpha_key) {
                Some(scalar(self.src.as_ref(), &alpha_key)?)
            } else {
                config.alpha_for(short)
            };
            let layer = self.layer(part, short, down, up, alpha, config.rslora)?;
            self.layers.push(layer);
        }
        Ok(())
    }

    /// The factors of layer `i` as f32: (up (out, rank), down (rank, in * kh * kw)).
    pub(crate) fn factors(&self, i: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = &self.layers[i];
        let read = |n: &str| {
            let t = self.src.tensor(n).ok_or_else(|| self.bad(format!("{n} cannot be read")))?;
            t.to_f32(n)
        };
        Ok((read(&l.up)?, read(&l.down)?))
    }
}

/// The safetensors metadata key under which diffusers saves PEFT's LoRA config.
pub const ADAPTER_METADATA: &str = "lora_adapter_metadata";

/// Every layer name a network's weights answer to, in kohya's and PEFT's spelling, mapped to the weight's name.
struct Targets {
    kohya: HashMap<String, String>,
    peft: HashMap<String, String>,
}

impl Targets {
    fn new(part: Part, src: &dyn TensorSource) -> Self {
        let names = src.names();
        let layout = (part == Part::Unet).then(|| Layout::from_diffusers_unet(&names));
        let (mut kohya, mut peft) = (HashMap::new(), HashMap::new());
        for name in &names {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            let module = module.strip_prefix("text_model.").unwrap_or(module);
            kohya.insert(module.replace('.', "_"), name.clone());
            peft.insert(module.to_string(), name.clone());
            // The original SD names, which trainers built on the ldm UNet write.
            if let Some(layout) = &layout
                && let Some((orig, _)) = original_name(Part::Unet, layout, name)
                && let Some(m) = orig.strip_prefix(UNET).and_then(|o| o.strip_suffix(".weight"))
            {
                kohya.entry(m.replace('.', "_")).or_insert_with(|| name.clone());
            }
        }
        Self { kohya, peft }
    }

    fn find(&self, format: LoraFormat, module: &str) -> Option<&String> {
        match format {
            LoraFormat::Kohya => self.kohya.get(module),
            LoraFormat::Peft => self.peft.get(module),
        }
    }
}

/// The model an in-width of a cross-attention key/value projection (the text embeddings' width) is from.
fn context_model(width: usize) -> String {
    match width {
        768 => "SD 1.x (768-wide text embeddings)".into(),
        1024 => "SD 2.x (1024-wide text embeddings)".into(),
        2048 => "SDXL (2048-wide text embeddings)".into(),
        w => format!("a model with {w}-wide text embeddings"),
    }
}

/// Checks that layer `l`'s update fits the weight `target` of shape `shape`; the error names the architecture
/// the LoRA was made for when the mismatch shows it.
fn check_fit(lora: &Lora, l: &LoraLayer, target: &str, shape: &[usize]) -> Result<()> {
    let out = shape.first().copied().unwrap_or(0);
    let k = shape.iter().product::<usize>().checked_div(out).unwrap_or(0);
    let (lo, lk) = (l.up_shape[0], l.down_shape[1..].iter().product::<usize>());
    if (lo, lk) == (out, k) && (l.down_shape.len() == 2 || shape.len() == 2 || l.down_shape[2..] == shape[2..]) {
        return Ok(());
    }
    let cross = target.contains("attn2.to_k") || target.contains("attn2.to_v");
    let why = if cross && lo == out {
        format!(
            ": its cross-attention reads {lk}-wide text embeddings, this model's read {k}. It is a LoRA for {}",
            context_model(lk)
        )
    } else {
        ": a LoRA for another model".into()
    };
    Err(Error::Invalid(format!(
        "{}: layer {} updates a {:?} weight with rank {} factors {:?} and {:?}, but the model's {target} is \
         {shape:?}{why}",
        lora.label(),
        l.module,
        [lo, lk],
        l.rank(),
        l.down_shape,
        l.up_shape
    )))
}

/// The LoRAs' updates for a text encoder's and a UNet's weights (`te`, `unet`: their tensors, whose names
/// say where each layer lands), with a warning per LoRA listing what it holds that this model has no place
/// for. A LoRA none of whose layers fits is an error.
pub fn patches<'a>(
    loras: &[(&'a Lora, f32)],
    te: &dyn TensorSource,
    unet: &dyn TensorSource,
) -> Result<(Patch<'a>, Patch<'a>, Vec<String>)> {
    let targets =
        [(Part::TextEncoder, Targets::new(Part::TextEncoder, te)), (Part::Unet, Targets::new(Part::Unet, unet))];
    let (mut te_patch, mut unet_patch, mut warnings) = (Patch::default(), Patch::default(), Vec::new());
    for &(lora, scale) in loras {
        let mut unmatched = lora.unknown.clone();
        let mut matched = 0;
        for (i, l) in lora.layers.iter().enumerate() {
            let (t, src, patch) = match l.part {
                Part::TextEncoder => (&targets[0].1, te, &mut te_patch),
                _ => (&targets[1].1, unet, &mut unet_patch),
            };
            let Some(target) = t.find(lora.format, &l.module) else {
                unmatched.push(l.down.clone());
                continue;
            };
            let shape = src.shape(target).ok_or_else(|| Error::Invalid(format!("{target} cannot be read")))?;
            check_fit(lora, l, target, &shape)?;
            patch.lora.entry(target.clone()).or_default().push(Update { lora, layer: i, coef: scale * l.scaling });
            matched += 1;
        }
        if matched == 0 {
            return Err(Error::Invalid(format!(
                "none of the {} layers of {} matches this model (e.g. {}): a LoRA for another architecture?",
                lora.layers.len(),
                lora.label(),
                lora.layers[0].module
            )));
        }
        if !unmatched.is_empty() {
            let shown: Vec<&str> = unmatched.iter().take(8).map(String::as_str).collect();
            let more = if unmatched.len() > shown.len() {
                format!(" and {} more", unmatched.len() - shown.len())
            } else {
                String::new()
            };
            warnings.push(format!(
                "the LoRA {} has {} tensors this model has no place for, not applied: {}{more}",
                lora.name,
                unmatched.len(),
                shown.join(", ")
            ));
        }
    }
    Ok((te_patch, unet_patch, warnings))
}
