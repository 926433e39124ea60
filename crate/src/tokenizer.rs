//! CLIP's tokenizer through the `tokenizers` crate, built from the `vocab.json` + `merges.txt` that model
//! repositories ship (they carry no `tokenizer.json`): the same pipeline transformers' converter builds for
//! `CLIPTokenizerFast` (NFC, whitespace collapsed, lowercase; CLIP's word regex; byte-level BPE with `</w>`),
//! then start/end tokens, truncation and padding to the model's length with the model's pad token.

use std::collections::HashMap;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, NormalizerWrapper, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenization regex (words, single digits, runs of other symbols).
const WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A token's byte range in the (cleaned) text.
type Offsets = (usize, usize);

/// A framed prompt chunk: `max_len` ids and each id's weight.
pub type Chunk = (Vec<u32>, Vec<f32>);

/// A CLIP tokenizer with its padding rule.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
    /// Textual-inversion triggers: the id the tokenizer gives each, and the embedding rows it stands for.
    added: HashMap<u32, Vec<u32>>,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("tokenizer: {what}: {e}"))
}

impl ClipTokenizer {
    /// Builds the tokenizer from the files' text. `pad_token` comes from the model's tokenizer config
    /// (SD1 pads with "<|endoftext|>", SD2 with "!"); `max_len` is the text encoder's (77).
    pub fn from_files(vocab_json: &str, merges_txt: &str, pad_token: &str, max_len: usize) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json).map_err(|e| err("vocab.json", e))?;
        let merges: Vec<(String, String)> = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(err("merges.txt", format!("bad line {l:?}"))),
                }
            })
            .collect::<Result<_>>()?;
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| err("vocab.json", format!("has no {t:?} token")));
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad_token)?);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| err("BPE", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(
                Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                    .map_err(|e| err("normalizer", e))?,
            ),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| err("normalizer", e))?;
        let split = Split::new(SplitPattern::Regex(WORDS.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| err("pre-tokenizer", e))?;
        tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ])));
        // The start, end and pad tokens are whole tokens even inside a prompt, as in CLIPTokenizer (so with
        // SD2's pad token "!", every "!" of a prompt becomes id 0, as there).
        tokenizer
            .add_special_tokens([
                AddedToken::from(BOS, true),
                AddedToken::from(EOS, true),
                AddedToken::from(pad_token, true),
            ])
            .map_err(|e| err("special tokens", e))?;
        Ok(Self { tokenizer, bos, eos, pad, max_len, added: HashMap::new() })
    }

    /// Makes `trigger` (matched anywhere in a prompt, as diffusers' `load_textual_inversion` adds it) stand for
    /// the `vectors` embedding rows from `first_row` on: one token id per vector, as diffusers' multi-vector
    /// tokens `trigger trigger_1 ...` do.
    pub fn add_embedding(&mut self, trigger: &str, first_row: u32, vectors: usize) -> Result<()> {
        let trigger = clean(trigger);
        if self.tokenizer.get_added_vocabulary().get_vocab().contains_key(&trigger) {
            return Err(err("embeddings", format!("two embeddings are triggered by {trigger:?}")));
        }
        self.tokenizer.add_tokens([AddedToken::from(trigger.clone(), false)]).map_err(|e| err("embeddings", e))?;
        let id = self
            .tokenizer
            .token_to_id(&trigger)
            .ok_or_else(|| err("embeddings", format!("{trigger:?} could not be added")))?;
        self.added.insert(id, (first_row..first_row + vectors as u32).collect());
        Ok(())
    }

    /// The ids (textual-inversion triggers expanded to their rows) and offsets of cleaned text.
    fn ids(&self, cleaned: &str) -> Result<(Vec<u32>, Vec<Offsets>)> {
        let enc = self.tokenizer.encode(cleaned, false).map_err(|e| err("encode", e))?;
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        for (&id, &off) in enc.get_ids().iter().zip(enc.get_offsets()) {
            match self.added.get(&id) {
                Some(rows) => {
                    ids.extend_from_slice(rows);
                    offsets.extend(std::iter::repeat_n(off, rows.len()));
                }
                None => {
                    ids.push(id);
                    offsets.push(off);
                }
            }
        }
        Ok((ids, offsets))
    }

    /// Reads a model's `tokenizer/` folder: vocab.json, merges.txt and the pad token from tokenizer_config.json
    /// (or special_tokens_map.json).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: &std::path::Path, max_len: usize) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| Error::Invalid(format!("{}: {e}", dir.join(name).display())))
        };
        let config = read("tokenizer_config.json").ok();
        let special = read("special_tokens_map.json").ok();
        let pad = pad_token(config.as_deref(), special.as_deref())?;
        Self::from_files(&read("vocab.json")?, &read("merges.txt")?, &pad, max_len)
    }

    /// `max_len` ids: start token, up to `max_len - 2` tokens of `text`, end token, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.frame(&self.ids(&clean(text))?.0))
    }

    /// The start token, at most `max_len - 2` of `body`, the end token, then padding to `max_len`.
    fn frame(&self, body: &[u32]) -> Vec<u32> {
        let keep = body.len().min(self.limit());
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        ids
    }

    /// [`ClipTokenizer::encode`] of a prompt in A1111's weighting syntax ([`crate::prompt::parse_weighted`]):
    /// each run tokenized alone, the brackets and weights removed (and LoRA tags, [`crate::prompt::lora_tags`]),
    /// and each id's weight (1 for the start, end and padding tokens). A prompt without weighting syntax gives
    /// `encode`'s ids, all weights 1.
    pub fn encode_weighted(&self, text: &str) -> Result<(Vec<u32>, Vec<f32>)> {
        let runs = crate::prompt::parse_weighted(&crate::prompt::lora_tags(text).0);
        if let [(only, w)] = runs.as_slice()
            && *w == 1.0
        {
            return Ok((self.encode(only)?, vec![1.0; self.max_len]));
        }
        let (mut body, mut weights) = (Vec::new(), Vec::new());
        for (run, w) in &runs {
            let ids = self.ids(&clean(run))?.0;
            weights.extend(std::iter::repeat_n(*w, ids.len()));
            body.extend(ids);
        }
        let keep = body.len().min(self.limit());
        let ids = self.frame(&body);
        let mut w = vec![1.0];
        w.extend_from_slice(&weights[..keep]);
        w.resize(self.max_len, 1.0);
        Ok((ids, w))
    }

    /// A1111's long prompts: the tokens (and their weights, all 1 unless `weighted`) of `text` in chunks of
    /// `max_len - 2`, each framed as a prompt of its own (start, chunk, end, padding); at least one chunk. The
    /// text encoder encodes each chunk alone and the UNet attends to them side by side.
    pub fn encode_chunks(&self, text: &str, weighted: bool) -> Result<Vec<Chunk>> {
        let runs = if weighted {
            crate::prompt::parse_weighted(&crate::prompt::lora_tags(text).0)
        } else {
            vec![(text.to_string(), 1.0)]
        };
        let (mut body, mut weights) = (Vec::new(), Vec::new());
        for (run, w) in &runs {
            let ids = self.ids(&clean(run))?.0;
            weights.extend(std::iter::repeat_n(*w, ids.len()));
            body.extend(ids);
        }
        let per = self.limit().max(1);
        let mut chunks: Vec<Chunk> = body
            .chunks(per)
            .zip(weights.chunks(per))
            .map(|(ids, w)| {
                let mut cw = vec![1.0];
                cw.extend_from_slice(w);
                cw.resize(self.max_len, 1.0);
                (self.frame(ids), cw)
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(self.empty_chunk());
        }
        Ok(chunks)
    }

    /// A chunk of no tokens (start, end, padding): what pads a prompt to another's number of chunks.
    pub fn empty_chunk(&self) -> Chunk {
        (self.frame(&[]), vec![1.0; self.max_len])
    }

    /// The words of a prompt past the token limit, as the text encoder will not see them (None when it all
    /// fits); `weighted` reads it in A1111's syntax, as [`ClipTokenizer::encode_weighted`] does.
    pub fn cut_off(&self, text: &str, weighted: bool) -> Result<Option<String>> {
        Ok(self.measure(text, weighted)?.1)
    }

    /// The tokens a prompt has (brackets and weights not counted when `weighted`) and the words past the
    /// limit of `max_len - 2`.
    pub fn measure(&self, text: &str, weighted: bool) -> Result<(usize, Option<String>)> {
        let runs = if weighted {
            crate::prompt::parse_weighted(&crate::prompt::lora_tags(text).0)
        } else {
            vec![(text.to_string(), 1.0)]
        };
        let mut room = self.max_len.saturating_sub(2);
        let (mut total, mut cut) = (0, Vec::new());
        for (run, _) in &runs {
            let cleaned = clean(run);
            let (ids, offsets) = self.ids(&cleaned)?;
            let n = ids.len();
            total += n;
            if room == 0 {
                cut.push(cleaned);
            } else if n <= room {
                room -= n;
            } else {
                // Offsets are in the normalized text (lowercased, whitespace collapsed).
                let start = offsets[room].0;
                cut.push(cleaned.to_lowercase().get(start..).unwrap_or_default().to_string());
                room = 0;
            }
        }
        let words = cut.join(" ").split_whitespace().collect::<Vec<_>>().join(" ");
        Ok((total, (!words.is_empty()).then_some(words)))
    }

    /// The most tokens of a prompt the text encoder sees.
    pub fn limit(&self) -> usize {
        self.max_len.saturating_sub(2)
    }

    /// How many tokens of `text` fit (the rest is cut): (used, total).
    pub fn count(&self, text: &str) -> Result<(usize, usize)> {
        let n = self.ids(&clean(text))?.0.len();
        Ok((n.min(self.max_len.saturating_sub(2)), n))
    }
}

/// CLIPTokenizer's text cleanup before BPE: ftfy's fixes that matter for prompts (HTML entities, curly quotes,
/// Latin ligatures, full-width ASCII, control characters), collapsed whitespace and Python's `str.lower`
/// (Rust's `to_lowercase` also knows the final sigma). The normalizer does NFC afterwards.
pub fn clean(text: &str) -> String {
    let text = unescape_html(&unescape_html(text));
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{02bc}' | '\u{2018}'..='\u{201b}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xff01 + 0x21).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}' | '\u{206a}'..='\u{206f}' | '\u{feff}' => {}
            '\u{fff9}'..='\u{fffc}' => {}
            _ => match ligature(c) {
                Some(s) => out.push_str(s),
                None => out.push(c),
            },
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// ftfy's `fix_latin_ligatures`.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Python's `html.unescape` for the named entities prompts carry and numeric references.
fn unescape_html(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end =
            rest[1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '#')).map(|e| e + 1).unwrap_or(rest.len());
        let name = &rest[1..end];
        let decoded = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            n if n.starts_with("#x") || n.starts_with("#X") => {
                u32::from_str_radix(&n[2..], 16).ok().and_then(char::from_u32)
            }
            n if n.starts_with('#') => n[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end..];
                if rest.starts_with(';') {
                    rest = &rest[1..];
                }
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The pad token named by a model's tokenizer_config.json or special_tokens_map.json (a string or an
/// AddedToken object); "<|endoftext|>" when neither names one.
pub fn pad_token(config: Option<&str>, special: Option<&str>) -> Result<String> {
    for text in [config, special].into_iter().flatten() {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| err("tokenizer config", e))?;
        match &v["pad_token"] {
            serde_json::Value::String(s) => return Ok(s.clone()),
            serde_json::Value::Object(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Ok(s.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(EOS.to_string())
}

/// CLIP's BPE merges (OpenAI CLIP and OpenCLIP share them), shipped so that single-file checkpoints, which
/// carry no tokenizer, need no download: the 48,894 merges of `bpe_simple_vocab_16e6.txt` that CLIP uses.
pub const CLIP_MERGES: &str = include_str!("../assets/clip/merges.txt");

/// CLIP's `vocab.json` built from its merges as CLIP builds it: the 256 byte symbols (GPT-2's byte-to-unicode
/// order), the same with `</w>`, one token per merge, then the start and end tokens (49,408 for CLIP's merges).
pub fn clip_vocab_json(merges_txt: &str) -> String {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = bytes.clone();
    let mut next = 256;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(next);
            next += 1;
        }
    }
    let symbols: Vec<String> = chars.iter().map(|&c| char::from_u32(c).expect("below 0x200").to_string()).collect();
    let mut tokens: Vec<String> = symbols.clone();
    tokens.extend(symbols.iter().map(|s| format!("{s}</w>")));
    tokens.extend(
        merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect::<String>()),
    );
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let map: serde_json::Map<String, serde_json::Value> =
        tokens.into_iter().enumerate().map(|(i, t)| (t, serde_json::Value::from(i))).collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    fn fixture(path: &str) -> String {
        let p = format!("{}/../tests/fixtures/tokenizer/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// The shipped merges rebuild the vocabulary transformers' CLIP tokenizer files hold.
    #[test]
    fn shipped_vocabulary_is_clips() {
        assert_eq!(CLIP_MERGES, fixture("merges.txt"));
        let ours: HashMap<String, u32> = serde_json::from_str(&clip_vocab_json(CLIP_MERGES)).unwrap();
        let theirs: HashMap<String, u32> = serde_json::from_str(&fixture("vocab.json")).unwrap();
        assert_eq!(ours.len(), 49408);
        assert_eq!(ours, theirs);
    }

    /// Ids equal transformers' CLIPTokenizer (the slow, ftfy-cleaning one) for SD1's and SD2's pad tokens.
    #[test]
    fn ids_match_clip_tokenizer() {
        let (vocab, merges) = (fixture("vocab.json"), fixture("merges.txt"));
        let refs: serde_json::Value = serde_json::from_str(&fixture("tokens.json")).unwrap();
        let prompts: Vec<String> = serde_json::from_value(refs["prompts"].clone()).unwrap();
        for (key, pad) in [("sd1", "<|endoftext|>"), ("sd2", "!")] {
            let tok = ClipTokenizer::from_files(&vocab, &merges, pad, 77).unwrap();
            let want: Vec<Vec<u32>> = serde_json::from_value(refs[key].clone()).unwrap();
            for (i, (p, w)) in prompts.iter().zip(&want).enumerate() {
                assert_eq!(&tok.encode(p).unwrap(), w, "{key} prompt {i}: {p:?}");
            }
        }
    }

    #[test]
    fn cleanup_follows_ftfy_and_python() {
        assert_eq!(clean("it\u{2019}s \u{201c}Q\u{201d} \u{fb01}ne \u{ff21}"), "it's \"q\" fine a");
        assert_eq!(clean("ΣΊΣΥΦΟΣ &amp;amp; &#65;"), "σίσυφος & a");
        assert_eq!(pad_token(Some(r#"{"pad_token": {"content": "!"}}"#), None).unwrap(), "!");
        assert_eq!(pad_token(None, None).unwrap(), "<|endoftext|>");
    }
}
