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
        let (bytes, label) = Bytes::map(path)?;
        Self::new(bytes, label)
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
        match self.tensor_bytes(name, 0..i.len) {
            Ok(data) => Some(HostTensor { dtype: host_dtype(i.dtype), shape: Cow::Borrowed(&i.shape), data }),
            Err(e) => {
                log::error!("{e}");
                None
            }
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.infos.get(name).map(|i| i.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.infos.keys().cloned().collect()
    }

    fn dtype(&self, name: &str) -> Option<HostDType> {
        self.infos.get(name).map(|i| host_dtype(i.dtype))
    }

    fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let bad = || Error::Invalid(format!("bytes {range:?} are outside tensor {name}"));
        let i = self.infos.get(name).ok_or_else(bad)?;
        if range.end > i.len || range.start > range.end {
            return Err(bad());
        }
        let start = i.start as usize + range.start;
        match &self.data {
            Data::Whole(b) => Ok(Cow::Borrowed(&b.as_ref()[start..start + range.len()])),
            Data::Ranged(read) => {
                let d = read(start as u64, range.len())
                    .map_err(|e| Error::Invalid(format!("reading {name} from {}: {e}", self.label)))?;
                if d.len() != range.len() {
                    return Err(Error::Invalid(format!("reading {name} from {}: a short read", self.label)));
                }
                Ok(Cow::Owned(d))
            }
        }
    }

    fn label(&self) -> String {
        self.label.clone()
    }
}

/// GGUF's type ids (ggml.h's `ggml_type`) for the block types we write.
fn ggml_type_id(d: GgmlDType) -> Result<u32> {
    Ok(match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::BF16 => 30,
        d => return Err(Error::Invalid(format!("writing {d:?} tensors to GGUF is not supported"))),
    })
}

pub use super::EMBEDDED_FILE;

/// One tensor a [`write`] call lays out: its name, row-major shape and block type.
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorPlan {
    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Tensor data in a GGUF file starts at, and is padded to, multiples of this.
pub const ALIGNMENT: usize = 32;

/// A GGUF v3 file's header for `tensors` (string metadata, tensor infos, padding): the tensors' data follows
/// it in order, each padded to [`ALIGNMENT`].
pub fn header(metadata: &[(String, String)], tensors: &[TensorPlan]) -> Result<Vec<u8>> {
    let mut head: Vec<u8> = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut head, k);
        head.extend(8u32.to_le_bytes()); // GGUF_TYPE_STRING
        string(&mut head, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        let block = t.dtype.block_size();
        if t.shape.last().is_none_or(|d| d % block != 0) {
            return Err(Error::Invalid(format!(
                "{}: rows of {:?} are not whole {:?} blocks",
                t.name, t.shape, t.dtype
            )));
        }
        string(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend((*d as u64).to_le_bytes());
        }
        head.extend(ggml_type_id(t.dtype)?.to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset += t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    head.resize(head.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    Ok(head)
}

impl Gguf {
    /// The diffusers files a converted model carries in its metadata ([`EMBEDDED_FILE`]), by path.
    pub fn embedded_files(&self) -> HashMap<String, String> {
        self.metadata
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(EMBEDDED_FILE)?.to_string(), v.to_string().ok()?.clone())))
            .collect()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// A whole GGUF file as `convert::Conversion` lays it out: [`header`], then each tensor's data padded to
    /// [`ALIGNMENT`]. Returns the bytes written.
    fn write(
        w: &mut impl std::io::Write,
        metadata: &[(String, String)],
        tensors: &[TensorPlan],
        mut data: impl FnMut(usize) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let io = |e: std::io::Error| Error::Invalid(format!("writing the GGUF file: {e}"));
        let head = header(metadata, tensors)?;
        w.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        for (i, t) in tensors.iter().enumerate() {
            let mut bytes = data(i)?;
            if bytes.len() != t.bytes() {
                return Err(Error::Invalid(format!(
                    "{}: {} bytes of data for {} in {:?}",
                    t.name,
                    bytes.len(),
                    t.bytes(),
                    t.dtype
                )));
            }
            bytes.resize(bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
            w.write_all(&bytes).map_err(io)?;
            written += bytes.len() as u64;
        }
        Ok(written)
    }

    /// What `write` writes, candle's reader reads: metadata, shapes (row-major), types, offsets, bytes.
    #[test]
    fn written_files_read_back_with_candle() {
        let tensors = vec![
            TensorPlan { name: "a".into(), shape: vec![2, 32], dtype: GgmlDType::Q8_0 },
            TensorPlan { name: "b".into(), shape: vec![3], dtype: GgmlDType::F32 },
            TensorPlan { name: "c".into(), shape: vec![4, 2, 3, 3], dtype: GgmlDType::F16 },
        ];
        let payload = |i: usize| -> Vec<u8> { (0..tensors[i].bytes()).map(|b| (b * 7 + i) as u8).collect() };
        let meta = vec![(format!("{EMBEDDED_FILE}unet/config.json"), "{\"x\": 1}".to_string())];
        let mut out = Vec::new();
        let n = write(&mut out, &meta, &tensors, |i| Ok(payload(i))).unwrap();
        assert_eq!(n as usize, out.len());
        let g = Gguf::new(Bytes::Owned(out), "t.gguf").unwrap();
        assert_eq!(g.embedded_files().get("unet/config.json").map(String::as_str), Some("{\"x\": 1}"));
        for (i, t) in tensors.iter().enumerate() {
            let h = g.tensor(&t.name).unwrap();
            assert_eq!(*h.shape, t.shape[..], "{}", t.name);
            assert_eq!(h.dtype, host_dtype(t.dtype));
            assert_eq!(*h.data, payload(i)[..], "{}", t.name);
        }
        let bad = [TensorPlan { name: "q".into(), shape: vec![3, 3], dtype: GgmlDType::Q4_0 }];
        assert!(write(&mut Vec::new(), &[], &bad, |_| Ok(vec![])).is_err());
    }

    #[test]
    fn truncated_files_are_refused() {
        let tensors = vec![TensorPlan { name: "a".into(), shape: vec![64], dtype: GgmlDType::F32 }];
        let mut out = Vec::new();
        write(&mut out, &[], &tensors, |_| Ok(vec![0; 256])).unwrap();
        out.truncate(out.len() - 100);
        let e = Gguf::new(Bytes::Owned(out), "cut.gguf").err().unwrap().to_string();
        assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    }
}
