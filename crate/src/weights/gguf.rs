//! GGUF files (stable-diffusion.cpp's format: the original SD tensor names, per-tensor f32, f16, bf16 or GGML
//! blocks), read with candle-core's GGUF reader. Only the header is parsed up front; tensors are sliced out of
//! the memory-mapped file natively, or read one at a time through a [`RangeReader`] in the browser, so the file
//! is never whole in memory. Quantized tensors keep their blocks ([`HostDType::Ggml`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};

use super::{Bytes, HostDType, HostTensor, RangeReader, TensorSource};
use crate::error::{Error, Result};

type Metadata = HashMap<String, Value>;

struct Info {
    dtype: GgmlDType,
    shape: Vec<usize>,
    /// Absolute byte offset and length in the file.
    start: u64,
    len: usize,
}

enum Data {
    Whole(Bytes),
    Ranged(RangeReader),
}

/// One GGUF file, its header parsed once.
pub struct Gguf {
    data: Data,
    infos: HashMap<String, Info>,
    metadata: Metadata,
    label: String,
}

/// Read + Seek over a [`RangeReader`], fetching 1 MiB at a time (candle's header parser reads small fields).
struct RangeCursor {
    read: RangeReader,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl Read for RangeCursor {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let buf_end = self.buf_start + self.buf.len() as u64;
        if self.pos < self.buf_start || self.pos >= buf_end {
            let n = (self.size - self.pos).min(1 << 20) as usize;
            self.buf = (self.read)(self.pos, n).map_err(|e| std::io::Error::other(e.to_string()))?;
            self.buf_start = self.pos;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let at = (self.pos - self.buf_start) as usize;
        let n = out.len().min(self.buf.len() - at);
        out[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeCursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::other("seek before the start of the file"))?;
        Ok(self.pos)
    }
}

impl Gguf {
    /// Reads the header: every tensor's place, checked against the file's `size`.
    fn parse<R: Read + Seek>(reader: &mut R, size: u64, label: &str) -> Result<(HashMap<String, Info>, Metadata)> {
        let bad = |what: String| {
            Error::Invalid(format!("{label} is not a complete GGUF file ({what}): truncated or corrupt?"))
        };
        let content = Content::read(reader).map_err(|e| bad(e.to_string()))?;
        let mut infos = HashMap::new();
        for (name, t) in content.tensor_infos {
            let shape = t.shape.dims().to_vec();
            let numel: usize = shape.iter().product();
            let block = t.ggml_dtype.block_size();
            if !numel.is_multiple_of(block) {
                return Err(bad(format!("{name} has {numel} elements, not whole {:?} blocks", t.ggml_dtype)));
            }
            let len = numel / block * t.ggml_dtype.type_size();
            let start = content.tensor_data_offset.checked_add(t.offset).filter(|s| s + len as u64 <= size);
            let Some(start) = start else {
                return Err(bad(format!("{name} ({len} bytes at {}) runs past the end ({size} bytes)", t.offset)));
            };
            infos.insert(name, Info { dtype: t.ggml_dtype, shape, start, len });
        }
        Ok((infos, content.metadata))
    }

    /// Parses the header of a complete GGUF file held in `bytes` (memory-mapped natively).
    pub fn new(bytes: Bytes, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let size = bytes.as_ref().len() as u64;
        let (infos, metadata) = Self::parse(&mut std::io::Cursor::new(bytes.as_ref()), size, &label)?;
        Ok(Self { data: Data::Whole(bytes), infos, metadata, label })
    }

    /// A GGUF file of `size` bytes read through `read` (the browser's cached Blobs).
    pub fn ranged(read: RangeReader, size: u64, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let mut cursor = RangeCursor { read: read.clone(), size, pos: 0, buf: Vec::new(), buf_start: 0 };
        let (infos, metadata) = Self::parse(&mut cursor, size, &label)?;
        Ok(Self { data: Data::Ranged(read), infos, metadata, label })
    }

    /// Memory-maps the file at `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let label = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::Invalid(format!("cannot open {label}: {e}")))?;
        // SAFETY: as in Safetensors::open: read-only, every slice bounds-checked against the parsed header.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Invalid(format!("cannot map {label}: {e}")))?;
        Self::new(Bytes::Mapped(map), label)
    }

    /// A metadata string, if present.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    /// The file's block types and how many tensors use each (for messages and benchmarks).
    pub fn dtypes(&self) -> Vec<(GgmlDType, usize)> {
        let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
        for i in self.infos.values() {
            match counts.iter_mut().find(|(d, _)| *d == i.dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((i.dtype, 1)),
            }
        }
        counts
    }
}

fn host_dtype(g: GgmlDType) -> HostDType {
    match g {
        GgmlDType::F32 => HostDType::F32,
        GgmlDType::F16 => HostDType::F16,
        GgmlDType::BF16 => HostDType::BF16,
        g => HostDType::Ggml(g),
    }
}

impl TensorSource for Gguf {
    fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let i = self.infos.get(name)?;
        let data = match &self.data {
            Data::Whole(b) => Cow::Borrowed(&b.as_ref()[i.start as usize..i.start as usize + i.len]),
            Data::Ranged(read) => match read(i.start, i.len) {
                Ok(d) if d.len() == i.len => Cow::Owned(d),
                Ok(d) => {
                    log::error!("reading {name} from {}: {} of {} bytes", self.label, d.len(), i.len);
                    return None;
                }
                Err(e) => {
                    log::error!("reading {name} from {}: {e}", self.label);
                    return None;
                }
            },
        };
        Some(HostTensor { dtype: host_dtype(i.dtype), shape: Cow::Borrowed(&i.shape), data })
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.infos.get(name).map(|i| i.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.infos.keys().cloned().collect()
    }

    fn label(&self) -> String {
        self.label.clone()
    }
}
