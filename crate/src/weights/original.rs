//! The original Stable Diffusion checkpoint names (CompVis / Stability's `ldm` modules, as A1111, ComfyUI,
//! stable-diffusion.cpp and model-sharing sites store single-file models) and their diffusers equivalents.
//!
//! One table, read in the direction diffusers' `from_single_file` converts: every tensor of the file gets the
//! diffusers name our models load, plus the reshape or split it needs (the VAE's 1x1-conv attention weights
//! become linear weights; OpenCLIP's fused `in_proj` becomes q, k and v). Nothing is copied: [`Remapped`] is a
//! view that answers diffusers names with the file's bytes.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use super::{HostTensor, TensorSource};
use crate::error::{Error, Result};

/// The three networks a single-file checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    TextEncoder,
    Unet,
    Vae,
}

/// The tensor prefix of each network in an SD 1.x / 2.x checkpoint.
pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
/// SD 1.x: transformers' CLIPTextModel, with or without `text_model.` after it.
pub const CLIP_L: &str = "cond_stage_model.transformer.";
/// SD 2.x: OpenCLIP's text tower.
pub const OPEN_CLIP: &str = "cond_stage_model.model.";

/// How a file's tensor becomes the tensor a model asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Same,
    /// (out, in, 1, 1) -> (out, in): the VAE's attention projections, stored as 1x1 convolutions.
    Squeeze,
    /// Rows `index * n / of .. (index + 1) * n / of` of a fused projection (OpenCLIP's in_proj: q, k, v).
    Chunk {
        index: usize,
        of: usize,
    },
    /// (out, in) -> (out, in, 1, 1): writing the VAE's attention projections in ldm's layout.
    Unsqueeze,
}

impl Op {
    fn shape(self, shape: &[usize]) -> Option<Vec<usize>> {
        match self {
            Op::Same => Some(shape.to_vec()),
            Op::Squeeze => match shape {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                s => Some(s.to_vec()),
            },
            Op::Unsqueeze => match shape {
                [o, i] => Some(vec![*o, *i, 1, 1]),
                s => Some(s.to_vec()),
            },
            Op::Chunk { of, .. } => {
                let (&rows, rest) = shape.split_first()?;
                rows.is_multiple_of(of).then(|| [&[rows / of], rest].concat())
            }
        }
    }
}

/// Where each diffusers name of one network lives in the file.
pub type NameMap = HashMap<String, (String, Op)>;

/// What the numbering of ldm's blocks depends on: levels, resnets per block, which UNet up blocks have
/// attention (their upsampler comes after it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub unet_levels: usize,
    /// Resnets per UNet down block (up blocks have one more).
    pub unet_layers: usize,
    pub up_attention: Vec<bool>,
    pub vae_levels: usize,
    /// Resnets per VAE encoder block (decoder blocks have one more).
    pub vae_layers: usize,
}

impl Layout {
    /// Reads the layout off a checkpoint's tensor names. Fails when the UNet's blocks are not SD's layout.
    pub fn from_names(names: &[String]) -> Result<Self> {
        let unet: Vec<&str> = names.iter().filter_map(|n| n.strip_prefix(UNET)).collect();
        let (unet_levels, unet_layers) = unet_blocks(&unet)?;
        let per = unet_layers + 1;
        let up_attention = (0..unet_levels)
            .map(|b| {
                let attn = format!("output_blocks.{}.1.", b * per);
                unet.iter().any(|k| k.starts_with(&attn) && !k[attn.len()..].starts_with("conv."))
            })
            .collect();
        let vae: Vec<&str> = names.iter().filter_map(|n| n.strip_prefix(VAE)).collect();
        let count = |prefix: &str| {
            vae.iter()
                .filter_map(|k| k.strip_prefix(prefix)?.split_once('.')?.0.parse::<usize>().ok())
                .max()
                .map_or(0, |m| m + 1)
        };
        Ok(Self {
            unet_levels,
            unet_layers,
            up_attention,
            vae_levels: count("encoder.down."),
            vae_layers: count("encoder.down.0.block."),
        })
    }
}

impl Layout {
    /// The UNet's layout read off diffusers names (a UNet's own weights file), for naming its tensors the
    /// original way; the VAE's fields stay 0.
    pub fn from_diffusers_unet(names: &[String]) -> Self {
        let count = |prefix: &str| {
            names
                .iter()
                .filter_map(|k| k.strip_prefix(prefix)?.split_once('.')?.0.parse::<usize>().ok())
                .max()
                .map_or(0, |m| m + 1)
        };
        let unet_levels = count("down_blocks.");
        let up_attention = (0..unet_levels)
            .map(|b| names.iter().any(|k| k.starts_with(&format!("up_blocks.{b}.attentions."))))
            .collect();
        Self { unet_levels, unet_layers: count("down_blocks.0.resnets."), up_attention, ..Default::default() }
    }
}

/// The names of a checkpoint's networks, from its tensor names.
#[derive(Debug, Default)]
pub struct Mapping {
    pub text_encoder: NameMap,
    pub unet: NameMap,
    pub vae: NameMap,
    pub layout: Layout,
    /// Whether the text encoder is OpenCLIP (SD 2.x) rather than OpenAI's CLIP (SD 1.x).
    pub open_clip: bool,
    /// Tensors of a known network that no rule maps (reported as a warning).
    pub unknown: Vec<String>,
}

impl Mapping {
    /// Maps every tensor of `names` (a whole checkpoint). Fails when the UNet's block layout cannot be read.
    pub fn new(names: &[String]) -> Result<Self> {
        let layout = Layout::from_names(names)?;
        let (unet_table, vae_table) = (unet_table(&layout), vae_table(&layout));
        let mut m = Mapping { layout, ..Default::default() };
        m.open_clip = names.iter().any(|n| n.starts_with(OPEN_CLIP));
        for name in names {
            let mapped = if let Some(k) = name.strip_prefix(UNET) {
                to_diffusers(&unet_table, k).map(|(d, op)| (Part::Unet, d, op))
            } else if let Some(k) = name.strip_prefix(VAE) {
                to_diffusers(&vae_table, k).map(|(d, op)| (Part::Vae, d, op))
            } else if let Some(k) = name.strip_prefix(CLIP_L) {
                clip_name(k).map(|d| (Part::TextEncoder, d, Op::Same))
            } else if let Some(k) = name.strip_prefix(OPEN_CLIP) {
                for (d, op) in open_clip_names(k) {
                    m.text_encoder.insert(d, (name.clone(), op));
                }
                continue;
            } else {
                continue; // EMA copies, logit scales, optimizer state ...: not ours to load
            };
            match mapped {
                Some((part, d, op)) => {
                    let map = match part {
                        Part::TextEncoder => &mut m.text_encoder,
                        Part::Unet => &mut m.unet,
                        Part::Vae => &mut m.vae,
                    };
                    map.insert(d, (name.clone(), op));
                }
                None if !is_ignored(name) => m.unknown.push(name.clone()),
                None => {}
            }
        }
        Ok(m)
    }

    pub fn part(&self, part: Part) -> &NameMap {
        match part {
            Part::TextEncoder => &self.text_encoder,
            Part::Unet => &self.unet,
            Part::Vae => &self.vae,
        }
    }
}

/// Buffers and heads that checkpoints carry and no model loads.
fn is_ignored(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("text_projection") || name.ends_with("logit_scale")
}

/// The UNet's (levels, resnets per level) from its input blocks: with L levels (L - 1 downsamplers) and n
/// resnets per level, the input blocks are numbered 0 ..= L * (n + 1) - 1.
fn unet_blocks(keys: &[&str]) -> Result<(usize, usize)> {
    let mut blocks = BTreeSet::new();
    let mut downsamplers = BTreeSet::new();
    for k in keys {
        if let Some(rest) = k.strip_prefix("input_blocks.") {
            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
            if let Ok(i) = i.parse::<usize>() {
                blocks.insert(i);
                if rest.starts_with("0.op.") {
                    downsamplers.insert(i);
                }
            }
        }
    }
    let Some(&last) = blocks.last() else {
        return Err(Error::Invalid("the checkpoint's UNet has no input_blocks".into()));
    };
    let levels = downsamplers.len() + 1;
    let per = (last + 1) / levels;
    if per < 2 || per * levels != last + 1 || blocks.len() != last + 1 {
        return Err(Error::Invalid(format!(
            "the checkpoint's UNet has input blocks 0..={last} with {} downsamplers: not a Stable Diffusion \
             1.x/2.x layout",
            downsamplers.len()
        )));
    }
    Ok((levels, per - 1))
}

/// How the names under a table entry's prefix change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inner {
    Same,
    /// ldm's ResBlock -> diffusers' ResnetBlock2D.
    Resnet,
    /// The VAE's resnets: only the shortcut is renamed.
    VaeResnet,
    /// The VAE's attention: renamed, its projections 1x1 convolutions in ldm.
    VaeAttention,
}

/// (ldm, diffusers) names inside each kind of block; the first diffusers name is the one written.
const RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];
const VAE_RESNET: [(&str, &str); 1] = [("nin_shortcut.", "conv_shortcut.")];
/// diffusers' deprecated attention names (SD 1.x VAE folders) come after the current ones.
const VAE_ATTENTION: [(&str, &str); 9] = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
    ("q.", "query."),
    ("k.", "key."),
    ("v.", "value."),
    ("proj_out.", "proj_attn."),
];

/// One block: its ldm prefix, its diffusers prefix, how names inside change.
type Table = Vec<(String, String, Inner)>;

/// The UNet's blocks (names after `model.diffusion_model.`) for `l`'s layout.
fn unet_table(l: &Layout) -> Table {
    let e = |o: String, d: String, i: Inner| (o, d, i);
    let mut t: Table = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ]
    .iter()
    .map(|(o, d)| e(o.to_string(), d.to_string(), Inner::Same))
    .collect();
    let per = l.unet_layers + 1;
    for b in 0..l.unet_levels {
        for j in 0..l.unet_layers {
            let i = 1 + b * per + j;
            t.push(e(format!("input_blocks.{i}.0."), format!("down_blocks.{b}.resnets.{j}."), Inner::Resnet));
            t.push(e(format!("input_blocks.{i}.1."), format!("down_blocks.{b}.attentions.{j}."), Inner::Same));
        }
        if b + 1 < l.unet_levels {
            let i = (b + 1) * per;
            t.push(e(format!("input_blocks.{i}.0.op."), format!("down_blocks.{b}.downsamplers.0.conv."), Inner::Same));
        }
        let attention = l.up_attention.get(b).copied().unwrap_or(false);
        for j in 0..per {
            let i = b * per + j;
            t.push(e(format!("output_blocks.{i}.0."), format!("up_blocks.{b}.resnets.{j}."), Inner::Resnet));
            if attention {
                t.push(e(format!("output_blocks.{i}.1."), format!("up_blocks.{b}.attentions.{j}."), Inner::Same));
            }
        }
        if b + 1 < l.unet_levels {
            // The upsampler follows the last resnet, or its attention.
            let (i, k) = (b * per + l.unet_layers, if attention { 2 } else { 1 });
            t.push(e(format!("output_blocks.{i}.{k}."), format!("up_blocks.{b}.upsamplers.0."), Inner::Same));
        }
    }
    t.push(e("middle_block.0.".into(), "mid_block.resnets.0.".into(), Inner::Resnet));
    t.push(e("middle_block.1.".into(), "mid_block.attentions.0.".into(), Inner::Same));
    t.push(e("middle_block.2.".into(), "mid_block.resnets.1.".into(), Inner::Resnet));
    t
}

/// The VAE's blocks (names after `first_stage_model.`) for `l`'s layout. ldm numbers the decoder's levels from
/// the lowest resolution, diffusers from the first up block.
fn vae_table(l: &Layout) -> Table {
    let e = |o: String, d: String, i: Inner| (o, d, i);
    let mut t: Table = Vec::new();
    for name in ["quant_conv.", "post_quant_conv."] {
        t.push(e(name.into(), name.into(), Inner::Same));
    }
    let n = l.vae_levels;
    for side in ["encoder", "decoder"] {
        for conv in ["conv_in.", "conv_out."] {
            t.push(e(format!("{side}.{conv}"), format!("{side}.{conv}"), Inner::Same));
        }
        t.push(e(format!("{side}.norm_out."), format!("{side}.conv_norm_out."), Inner::Same));
        t.push(e(format!("{side}.mid.block_1."), format!("{side}.mid_block.resnets.0."), Inner::VaeResnet));
        t.push(e(format!("{side}.mid.block_2."), format!("{side}.mid_block.resnets.1."), Inner::VaeResnet));
        t.push(e(format!("{side}.mid.attn_1."), format!("{side}.mid_block.attentions.0."), Inner::VaeAttention));
    }
    for i in 0..n {
        for j in 0..l.vae_layers {
            t.push(e(
                format!("encoder.down.{i}.block.{j}."),
                format!("encoder.down_blocks.{i}.resnets.{j}."),
                Inner::VaeResnet,
            ));
        }
        let o = n - 1 - i;
        for j in 0..=l.vae_layers {
            t.push(e(
                format!("decoder.up.{o}.block.{j}."),
                format!("decoder.up_blocks.{i}.resnets.{j}."),
                Inner::VaeResnet,
            ));
        }
        if i + 1 < n {
            t.push(e(
                format!("encoder.down.{i}.downsample."),
                format!("encoder.down_blocks.{i}.downsamplers.0."),
                Inner::Same,
            ));
            t.push(e(format!("decoder.up.{o}.upsample."), format!("decoder.up_blocks.{i}.upsamplers.0."), Inner::Same));
        }
    }
    t
}

/// The renames inside a block, as (ldm, diffusers) pairs.
fn inner_pairs(inner: Inner) -> &'static [(&'static str, &'static str)] {
    match inner {
        Inner::Same => &[],
        Inner::Resnet => &RESNET,
        Inner::VaeResnet => &VAE_RESNET,
        Inner::VaeAttention => &VAE_ATTENTION,
    }
}

/// Whether a VAE attention tensor is one of the projections ldm stores as a 1x1 convolution.
fn is_projection(inner: Inner, rest: &str) -> bool {
    inner == Inner::VaeAttention
        && rest.ends_with("weight")
        && !rest.starts_with("norm.")
        && !rest.starts_with("group_norm.")
}

/// An ldm name (under its network's prefix) as diffusers names it, with the reshape it needs.
fn to_diffusers(table: &Table, k: &str) -> Option<(String, Op)> {
    rename(table, k, true)
}

/// A diffusers name as ldm names it (under its network's prefix), with the reshape it needs.
fn to_original(table: &Table, d: &str) -> Option<(String, Op)> {
    rename(table, d, false)
}

/// `name` through `table`: the block with the longest matching prefix, then the renames inside it, from
/// ldm's names to diffusers' (`forward`) or back.
fn rename(table: &Table, name: &str, forward: bool) -> Option<(String, Op)> {
    fn ends(e: &(String, String, Inner), forward: bool) -> (&str, &str) {
        if forward { (&e.0, &e.1) } else { (&e.1, &e.0) }
    }
    let entry =
        table.iter().filter(|e| name.starts_with(ends(e, forward).0)).max_by_key(|e| ends(e, forward).0.len())?;
    let ((from, to), inner) = (ends(entry, forward), entry.2);
    let rest = &name[from.len()..];
    let renamed = inner_pairs(inner).iter().find_map(|&(lo, ld)| {
        let (a, b) = if forward { (lo, ld) } else { (ld, lo) };
        rest.strip_prefix(a).map(|r| format!("{b}{r}"))
    });
    let rest = match renamed {
        Some(r) => r,
        None if inner == Inner::Resnet => return None,
        None => rest.to_string(),
    };
    let op = match (is_projection(inner, &rest), forward) {
        (false, _) => Op::Same,
        (true, true) => Op::Squeeze,
        (true, false) => Op::Unsqueeze,
    };
    Some((format!("{to}{rest}"), op))
}

/// The ldm name a diffusers-named tensor of `part` gets in a single-file checkpoint (as stable-diffusion.cpp
/// names it: CLIP names under `cond_stage_model.transformer.` for both SD 1.x and 2.x), with its reshape.
pub fn original_name(part: Part, layout: &Layout, d: &str) -> Option<(String, Op)> {
    match part {
        Part::Unet => to_original(&unet_table(layout), d).map(|(o, op)| (format!("{UNET}{o}"), op)),
        Part::Vae => to_original(&vae_table(layout), d).map(|(o, op)| (format!("{VAE}{o}"), op)),
        Part::TextEncoder => {
            let d = d.strip_prefix("text_model.").unwrap_or(d);
            Some((format!("{CLIP_L}text_model.{d}"), Op::Same))
        }
    }
}

/// An SD 1.x text encoder name (after `cond_stage_model.transformer.`), with `text_model.` in front.
pub fn clip_name(k: &str) -> Option<String> {
    let k = k.strip_prefix("text_model.").unwrap_or(k);
    (k.starts_with("embeddings.") && !k.ends_with("position_ids")
        || k.starts_with("encoder.")
        || k.starts_with("final_layer_norm."))
    .then(|| format!("text_model.{k}"))
}

/// An SD 2.x OpenCLIP text tower name (after `cond_stage_model.model.`): transformers' CLIPTextModel names
/// (several for the fused q/k/v projection).
pub fn open_clip_names(k: &str) -> Vec<(String, Op)> {
    let one = |d: String| vec![(format!("text_model.{d}"), Op::Same)];
    match k {
        "token_embedding.weight" => return one("embeddings.token_embedding.weight".into()),
        "positional_embedding" => return one("embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(r) = k.strip_prefix("ln_final.") {
        return one(format!("final_layer_norm.{r}"));
    }
    let Some(rest) = k.strip_prefix("transformer.resblocks.") else { return Vec::new() };
    let Some((i, rest)) = rest.split_once('.') else { return Vec::new() };
    let layer = format!("text_model.encoder.layers.{i}");
    let fused = |param: &str| {
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(index, p)| (format!("{layer}.self_attn.{p}.{param}"), Op::Chunk { index, of: 3 }))
            .collect()
    };
    match rest {
        "attn.in_proj_weight" => return fused("weight"),
        "attn.in_proj_bias" => return fused("bias"),
        _ => {}
    }
    const RENAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    RENAMES
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| vec![(format!("{layer}.{to}{r}"), Op::Same)]))
        .unwrap_or_default()
}

/// One network of a checkpoint under its diffusers names: a view, no copies.
pub struct Remapped<'a> {
    pub file: &'a dyn TensorSource,
    pub map: &'a NameMap,
    pub label: String,
}

impl TensorSource for Remapped<'_> {
    fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let (orig, op) = self.map.get(name)?;
        let t = self.file.tensor(orig)?;
        let shape = op.shape(&t.shape)?;
        let data = match *op {
            Op::Same | Op::Squeeze | Op::Unsqueeze => t.data,
            Op::Chunk { index, of } => {
                let part = t.data.len() / of;
                match t.data {
                    Cow::Borrowed(b) => Cow::Borrowed(&b[index * part..(index + 1) * part]),
                    Cow::Owned(v) => Cow::Owned(v[index * part..(index + 1) * part].to_vec()),
                }
            }
        };
        Some(HostTensor { dtype: t.dtype, shape: Cow::Owned(shape), data })
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (orig, op) = self.map.get(name)?;
        op.shape(&self.file.shape(orig)?)
    }

    fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    fn dtype(&self, name: &str) -> Option<super::HostDType> {
        self.file.dtype(&self.map.get(name)?.0)
    }

    fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> crate::Result<Cow<'_, [u8]>> {
        let unknown = || Error::Invalid(format!("no tensor {name} in {}", self.label));
        let (orig, op) = self.map.get(name).ok_or_else(unknown)?;
        match *op {
            Op::Same | Op::Squeeze | Op::Unsqueeze => self.file.tensor_bytes(orig, range),
            Op::Chunk { index, of } => {
                let shape = self.file.shape(orig).ok_or_else(unknown)?;
                let dtype = self.file.dtype(orig).ok_or_else(unknown)?;
                let part = dtype.bytes(shape.iter().product()).ok_or_else(unknown)? / of;
                if range.end > part {
                    return Err(Error::Invalid(format!("bytes {range:?} are outside {name}")));
                }
                self.file.tensor_bytes(orig, index * part + range.start..index * part + range.end)
            }
        }
    }

    fn label(&self) -> String {
        self.label.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's layout: 4 levels of 2 resnets, no attention in the last down / first up block.
    fn sd15() -> Layout {
        Layout {
            unet_levels: 4,
            unet_layers: 2,
            up_attention: vec![false, true, true, true],
            vae_levels: 4,
            vae_layers: 2,
        }
    }

    /// Pairs from diffusers' conversion (scripts/convert_diffusers_to_original_stable_diffusion.py and
    /// from_single_file), both ways.
    #[test]
    fn sd15_names_match_diffusers_conversion() {
        let l = sd15();
        let unet = [
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight", Op::Same),
            ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight", Op::Same),
            ("input_blocks.11.0.emb_layers.1.bias", "down_blocks.3.resnets.1.time_emb_proj.bias", Op::Same),
            ("input_blocks.8.1.proj_out.weight", "down_blocks.2.attentions.1.proj_out.weight", Op::Same),
            (
                "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                Op::Same,
            ),
            ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight", Op::Same),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight", Op::Same),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias", Op::Same),
            (
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                Op::Same,
            ),
            ("output_blocks.9.0.in_layers.0.weight", "up_blocks.3.resnets.0.norm1.weight", Op::Same),
            ("time_embed.2.weight", "time_embedding.linear_2.weight", Op::Same),
            ("out.2.bias", "conv_out.bias", Op::Same),
        ];
        let t = unet_table(&l);
        for (o, d, op) in unet {
            assert_eq!(to_diffusers(&t, o), Some((d.to_string(), op)), "{o}");
            assert_eq!(original_name(Part::Unet, &l, d), Some((format!("{UNET}{o}"), op)), "{d}");
        }
        let vae = [
            ("decoder.up.3.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight", Op::Same),
            (
                "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
                Op::Same,
            ),
            ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight", Op::Same),
            ("encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias", Op::Same),
            ("encoder.mid.attn_1.q.weight", "encoder.mid_block.attentions.0.to_q.weight", Op::Squeeze),
            ("decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias", Op::Same),
            ("decoder.mid.attn_1.norm.weight", "decoder.mid_block.attentions.0.group_norm.weight", Op::Same),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight", Op::Same),
            ("post_quant_conv.weight", "post_quant_conv.weight", Op::Same),
        ];
        let t = vae_table(&l);
        for (o, d, op) in vae {
            assert_eq!(to_diffusers(&t, o), Some((d.to_string(), op)), "{o}");
            let back = if op == Op::Squeeze { Op::Unsqueeze } else { op };
            assert_eq!(original_name(Part::Vae, &l, d), Some((format!("{VAE}{o}"), back)), "{d}");
        }
        // SD 1.x VAE folders' deprecated names are written under the same ldm names.
        let deprecated = original_name(Part::Vae, &l, "decoder.mid_block.attentions.0.query.weight");
        assert_eq!(deprecated, Some((format!("{VAE}decoder.mid.attn_1.q.weight"), Op::Unsqueeze)));
        assert_eq!(to_diffusers(&unet_table(&l), "input_blocks.1.0.bogus.weight"), None);
    }

    #[test]
    fn layout_is_read_off_the_names() {
        let l = sd15();
        let mut names: Vec<String> = unet_table(&l).iter().map(|(o, _, _)| format!("{UNET}{o}weight")).collect();
        // Attention blocks exist only where the layout has them.
        names.retain(|n| !n.contains("input_blocks.10.1.") && !n.contains("input_blocks.11.1."));
        names.extend(vae_table(&l).iter().map(|(o, _, _)| format!("{VAE}{o}weight")));
        assert_eq!(Layout::from_names(&names).unwrap(), l);
        let e =
            Layout::from_names(&[format!("{UNET}input_blocks.0.0.weight"), format!("{UNET}input_blocks.5.0.weight")]);
        assert!(e.unwrap_err().to_string().contains("not a Stable Diffusion"));
    }

    #[test]
    fn open_clip_in_proj_splits_into_q_k_v() {
        let names = open_clip_names("transformer.resblocks.7.attn.in_proj_weight");
        let want: Vec<(String, Op)> = ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (format!("text_model.encoder.layers.7.self_attn.{p}_proj.weight"), Op::Chunk { index: i, of: 3 })
            })
            .collect();
        assert_eq!(names, want);
        assert_eq!(Op::Chunk { index: 1, of: 3 }.shape(&[3072, 1024]), Some(vec![1024, 1024]));
        assert_eq!(Op::Chunk { index: 0, of: 3 }.shape(&[100, 4]), None);
    }
}
