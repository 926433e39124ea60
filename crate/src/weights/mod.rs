//! Model weights: safetensors files (f32, f16 or bf16 on disk) read tensor by tensor, checked against the
//! shape the model expects, converted to the load policy's dtypes and uploaded. A missing or mis-shaped
//! tensor is an error naming the tensor, the expected and the found shape.

pub mod embedding;
pub mod gguf;
pub mod lora;
pub mod original;

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use safetensors::{Dtype, tensor::Metadata};

use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, QBLOCK, Tensor};
use crate::ops;

/// How a tensor is used, which decides the dtype it is stored in on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Biases, norm scales and shifts: the activation dtype.
    Param,
    /// A linear layer's weight (out, in): the policy's weight dtype.
    Linear,
    /// A conv weight (out, in, kh, kw): the policy's weight dtype; quantized ones become (out, in * kh * kw).
    Conv,
    /// An embedding table (rows, dim): f32 or f16, never quantized (rows are gathered).
    Embedding,
}

/// The dtypes weights are stored in on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadPolicy {
    /// Activations and [`Role::Param`] tensors: f32 or f16 (f16 needs shader-f16).
    pub act: DType,
    /// Linear and conv weights: f32, f16, q8_0 or q4_0. Matrices whose rows are not a multiple of 32 fall
    /// back to f16 when a quantized dtype is asked for.
    pub weights: DType,
}

impl LoadPolicy {
    pub const F32: LoadPolicy = LoadPolicy { act: DType::F32, weights: DType::F32 };

    /// The dtype for a weight of `role` whose rows (the reduced dimension) have `row` elements.
    fn dtype_for(&self, role: Role, row: usize) -> DType {
        let w = match (self.act, self.weights) {
            // f16 activations read f16 weights as activations; f32 weights would need a cast per load.
            (DType::F16, DType::F32) => DType::F16,
            (_, w) => w,
        };
        match role {
            Role::Param => self.act,
            Role::Embedding => {
                if w == DType::F32 {
                    DType::F32
                } else {
                    DType::F16
                }
            }
            Role::Linear | Role::Conv if w.is_quantized() && !row.is_multiple_of(QBLOCK) => DType::F16,
            Role::Linear | Role::Conv => w,
        }
    }
}

/// How a file stores a tensor's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostDType {
    F32,
    F16,
    BF16,
    /// GGML blocks (GGUF files): q8_0, q4_0, q4_1, q5_0, q5_1 ...
    Ggml(GgmlDType),
    /// Anything else a safetensors file may hold (integers, f64 ...): not a weight we load.
    Other(Dtype),
}

impl From<Dtype> for HostDType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => HostDType::F32,
            Dtype::F16 => HostDType::F16,
            Dtype::BF16 => HostDType::BF16,
            d => HostDType::Other(d),
        }
    }
}

/// A tensor as stored in a file (or made up, for benchmarks).
#[derive(Clone, Debug)]
pub struct HostTensor<'a> {
    pub dtype: HostDType,
    pub shape: Cow<'a, [usize]>,
    pub data: Cow<'a, [u8]>,
}

impl HostTensor<'_> {
    /// The values as f32 (f32, f16 and bf16 files; GGML blocks dequantized by candle).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            HostDType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&self.data),
            HostDType::F16 => {
                bytemuck::pod_collect_to_vec::<u8, half::f16>(&self.data).iter().map(|v| v.to_f32()).collect()
            }
            HostDType::BF16 => {
                bytemuck::pod_collect_to_vec::<u8, half::bf16>(&self.data).iter().map(|v| v.to_f32()).collect()
            }
            HostDType::Ggml(g) => {
                let bad = |e: candle_core::Error| Error::Invalid(format!("tensor {name} ({g:?} blocks): {e}"));
                let cpu = candle_core::Device::Cpu;
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(g, &self.data, self.shape.to_vec(), &cpu)
                    .map_err(bad)?;
                q.dequantize(&cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>()).map_err(bad)?
            }
            HostDType::Other(d) => {
                return Err(Error::Invalid(format!("tensor {name} is {d:?}; weights must be f32, f16 or bf16")));
            }
        })
    }
}

/// Something that holds named tensors (one safetensors file, or several).
pub trait TensorSource {
    /// The tensor called `name`, if present.
    fn tensor(&self, name: &str) -> Option<HostTensor<'_>>;
    /// The tensor called `name` that a model expects with `shape`. Files ignore the shape (the caller checks
    /// it); [`RandomWeights`] makes one up.
    fn tensor_shaped(&self, name: &str, _shape: &[usize]) -> Option<HostTensor<'_>> {
        self.tensor(name)
    }
    /// What the source is, for error messages (e.g. the file's path).
    fn label(&self) -> String;
    /// The shape of `name`, if present, without reading its data.
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor(name).map(|t| t.shape.to_vec())
    }
    /// Every tensor's name (empty for sources that make tensors up).
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    /// How `name` is stored, if present, without reading its data.
    fn dtype(&self, name: &str) -> Option<HostDType> {
        self.tensor(name).map(|t| t.dtype)
    }
    /// Bytes `range` of `name`'s stored data, for reading a large tensor in pieces (files read only those
    /// bytes; the default reads the whole tensor).
    fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let t = self.tensor(name).ok_or_else(|| Error::Invalid(format!("{name} could not be read")))?;
        let bytes = t.data.get(range.clone()).ok_or_else(|| out_of_range(name, &range))?.to_vec();
        Ok(Cow::Owned(bytes))
    }
}

fn out_of_range(name: &str, range: &std::ops::Range<usize>) -> Error {
    Error::Invalid(format!("bytes {range:?} are outside tensor {name}"))
}

impl HostDType {
    /// Bytes that `numel` elements take in this storage (GGML types: whole blocks only).
    pub fn bytes(self, numel: usize) -> Option<usize> {
        match self {
            HostDType::F32 => Some(numel * 4),
            HostDType::F16 | HostDType::BF16 => Some(numel * 2),
            HostDType::Ggml(g) => numel.is_multiple_of(g.block_size()).then(|| numel / g.block_size() * g.type_size()),
            HostDType::Other(d) => Some(numel * d.bitsize() / 8),
        }
    }
}

/// The bytes of a safetensors file, memory-mapped or owned.
pub enum Bytes {
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
}

impl Bytes {
    /// Memory-maps the file at `path`; also returns its path for messages.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn map(path: &std::path::Path) -> Result<(Self, String)> {
        let label = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::Invalid(format!("cannot open {label}: {e}")))?;
        // SAFETY: the map is read-only; a file changed underneath us gives wrong weights, not unsoundness we
        // act on (every read is bounds-checked against the header parsed from it).
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Invalid(format!("cannot map {label}: {e}")))?;
        Ok((Bytes::Mapped(map), label))
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            #[cfg(not(target_arch = "wasm32"))]
            Bytes::Mapped(m) => m,
        }
    }
}

/// One safetensors file, its header parsed once.
pub struct Safetensors {
    bytes: Bytes,
    data_start: usize,
    metadata: Metadata,
    label: String,
}

impl Safetensors {
    /// Parses the header of a complete safetensors file; a truncated or foreign file is an error that says so.
    pub fn new(bytes: Bytes, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let (n, metadata) = safetensors::SafeTensors::read_metadata(bytes.as_ref()).map_err(|e| {
            Error::Invalid(format!("{label} is not a complete safetensors file ({e:?}): truncated or corrupt?"))
        })?;
        Ok(Self { bytes, data_start: 8 + n, metadata, label })
    }

    /// Memory-maps the file at `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let (bytes, label) = Bytes::map(path)?;
        Self::new(bytes, label)
    }

    /// Names and shapes of every tensor.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.metadata.tensors().into_iter().map(|(k, v)| (k, v.shape.clone())).collect()
    }
}

impl TensorSource for Safetensors {
    fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let info = self.metadata.info(name)?;
        let (a, b) = info.data_offsets;
        Some(HostTensor {
            dtype: info.dtype.into(),
            shape: Cow::Borrowed(&info.shape),
            data: Cow::Borrowed(&self.bytes.as_ref()[self.data_start + a..self.data_start + b]),
        })
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    fn dtype(&self, name: &str) -> Option<HostDType> {
        self.metadata.info(name).map(|i| i.dtype.into())
    }

    fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let (a, b) = self.metadata.info(name).ok_or_else(|| out_of_range(name, &range))?.data_offsets;
        if range.end > b - a || range.start > range.end {
            return Err(out_of_range(name, &range));
        }
        Ok(Cow::Borrowed(&self.bytes.as_ref()[self.data_start + a..][range]))
    }
}

/// Reads `len` bytes at `offset` of a file that is not in memory as a whole (in the browser, a Blob of cached
/// chunks read with FileReaderSync).
pub type RangeReader = std::rc::Rc<dyn Fn(u64, usize) -> Result<Vec<u8>>>;

/// A safetensors file read tensor by tensor through a [`RangeReader`]: only its header and the tensor being
/// uploaded are ever in memory, so a multi-gigabyte file streams from the cache to the GPU.
pub struct RangedSafetensors {
    read: RangeReader,
    data_start: u64,
    metadata: Metadata,
    label: String,
}

impl RangedSafetensors {
    /// Reads and checks the header of the `size`-byte file behind `read`.
    pub fn new(read: RangeReader, size: u64, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let bad = |what: String| {
            Error::Invalid(format!("{label} is not a complete safetensors file ({what}): truncated or corrupt?"))
        };
        if size < 8 {
            return Err(bad(format!("{size} bytes")));
        }
        let n = u64::from_le_bytes(read(0, 8)?.try_into().map_err(|_| bad("short read".into()))?);
        if n > 100 << 20 || 8 + n > size {
            return Err(bad(format!("a header of {n} bytes in a file of {size}")));
        }
        let header = read(8, n as usize)?;
        let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let end = 8 + n + metadata.data_len() as u64;
        if end != size {
            return Err(bad(format!("the header describes {end} bytes, the file has {size}")));
        }
        for (name, info) in metadata.tensors() {
            let want = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
            if info.data_offsets.1 - info.data_offsets.0 != want {
                return Err(bad(format!(
                    "{name} has {} bytes for shape {:?}",
                    info.data_offsets.1 - info.data_offsets.0,
                    info.shape
                )));
            }
        }
        Ok(Self { read, data_start: 8 + n, metadata, label })
    }
}

impl TensorSource for RangedSafetensors {
    fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
        let info = self.metadata.info(name)?;
        let (a, b) = info.data_offsets;
        match self.tensor_bytes(name, 0..b - a) {
            Ok(data) => Some(HostTensor { dtype: info.dtype.into(), shape: Cow::Borrowed(&info.shape), data }),
            Err(e) => {
                log::error!("{e}");
                None
            }
        }
    }

    fn label(&self) -> String {
        self.label.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    fn dtype(&self, name: &str) -> Option<HostDType> {
        self.metadata.info(name).map(|i| i.dtype.into())
    }

    fn tensor_bytes(&self, name: &str, range: std::ops::Range<usize>) -> Result<Cow<'_, [u8]>> {
        let (a, b) = self.metadata.info(name).ok_or_else(|| out_of_range(name, &range))?.data_offsets;
        if range.end > b - a || range.start > range.end {
            return Err(out_of_range(name, &range));
        }
        let data = (self.read)(self.data_start + (a + range.start) as u64, range.len())
            .map_err(|e| Error::Invalid(format!("reading {name} from {}: {e}", self.label)))?;
        if data.len() != range.len() {
            return Err(Error::Invalid(format!(
                "reading {name} from {}: {} of {} bytes",
                self.label,
                data.len(),
                range.len()
            )));
        }
        Ok(Cow::Owned(data))
    }
}

/// What changes a network's tensors as they load, by tensor name: LoRA updates merged into weights, rows
/// appended to an embedding table (textual inversion). Models never see it: they get the changed tensors.
#[derive(Default)]
pub struct Patch<'a> {
    /// Low-rank updates per weight.
    pub(crate) lora: HashMap<String, Vec<Update<'a>>>,
    /// Rows appended to a table: (row-major values, rows).
    pub(crate) rows: HashMap<String, (Vec<f32>, usize)>,
}

impl Patch<'_> {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.lora.is_empty() && self.rows.is_empty()
    }

    /// The tensors it changes.
    pub fn changed(&self) -> usize {
        self.lora.len() + self.rows.len()
    }
}

/// One LoRA layer's update of a weight: `coef` (the user's scale times alpha / rank) * up @ down.
pub(crate) struct Update<'a> {
    pub(crate) lora: &'a lora::Lora,
    pub(crate) layer: usize,
    pub(crate) coef: f32,
}

/// A view of a tensor source under a name prefix, uploading what models ask for.
#[derive(Clone)]
pub struct Weights<'a> {
    ctx: &'a GpuContext,
    src: &'a dyn TensorSource,
    policy: LoadPolicy,
    prefix: String,
    patch: Option<&'a Patch<'a>>,
}

impl<'a> Weights<'a> {
    pub fn new(ctx: &'a GpuContext, src: &'a dyn TensorSource, policy: LoadPolicy) -> Self {
        Self { ctx, src, policy, prefix: String::new(), patch: None }
    }

    /// The same weights with `patch` applied as they load.
    pub fn with_patch(self, patch: &'a Patch<'a>) -> Self {
        Self { patch: Some(patch), ..self }
    }

    /// The same source under `prefix.` (e.g. `down_blocks.0`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Weights { prefix, ..self.clone() }
    }

    /// The prefix, for messages about this part of the model.
    pub fn label(&self) -> &str {
        &self.prefix
    }

    pub fn ctx(&self) -> &'a GpuContext {
        self.ctx
    }

    pub fn policy(&self) -> LoadPolicy {
        self.policy
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// Whether the tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.src.shape(&self.full(name)).is_some()
    }

    /// The shape of `name` in the file, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.src.shape(&self.full(name))
    }

    /// The tensor `name`, which must have `shape`, uploaded for `role`. Tensors over [`UPLOAD_CHUNK`] bytes
    /// are read, converted and written in row blocks, so memory holds one block, never the whole tensor.
    /// A [`Patch`] given with [`Weights::with_patch`] changes the tensors it names on the way.
    pub fn get(&self, name: &str, shape: &[usize], role: Role) -> Result<Tensor> {
        let full = self.full(name);
        if let Some(patch) = self.patch {
            if let Some(updates) = patch.lora.get(&full) {
                return self.merged(&full, shape, role, updates);
            }
            if let Some((values, rows)) = patch.rows.get(&full) {
                return self.extended(&full, shape, role, values, *rows);
            }
        }
        self.load(&full, shape, role, None)
    }

    fn missing(&self, full: &str, shape: &[usize]) -> Error {
        Error::Invalid(format!("missing tensor {full} (expected shape {shape:?}) in {}", self.src.label()))
    }

    /// The stored tensor `full` uploaded for `role`, or, with `force`, in that dtype and the file's shape.
    fn load(&self, full: &str, shape: &[usize], role: Role, force: Option<DType>) -> Result<Tensor> {
        let missing = || self.missing(full, shape);
        // Convolutions quantized by `convert --quantize-convs` are stored as the (out, in * kh * kw) matrix
        // the GPU keeps them as.
        let flat_conv = |found: &[usize], dtype: HostDType| {
            role == Role::Conv
                && matches!(dtype, HostDType::Ggml(_))
                && found.len() == 2
                && found[0] == shape[0]
                && found[1] == shape[1..].iter().product::<usize>()
        };
        let check = |found: &[usize], dtype: HostDType| {
            if found != shape && !flat_conv(found, dtype) {
                return Err(Error::Invalid(format!(
                    "tensor {full} has shape {found:?}, expected {shape:?} (in {})",
                    self.src.label()
                )));
            }
            Ok(())
        };
        let target = |found: &[usize], host: HostDType| match force {
            Some(dtype) => (dtype, found.to_vec()),
            None => self.target(full, host, shape, role),
        };
        let numel: usize = shape.iter().product();
        // A file says shape and dtype without reading data; sources that make tensors up do not.
        let meta = self.src.shape(full).zip(self.src.dtype(full));
        let stored = meta.as_ref().and_then(|(_, d)| d.bytes(numel)).unwrap_or(0);
        if self.ctx.is_cpu() || stored <= UPLOAD_CHUNK || shape.len() < 2 {
            let host = self.src.tensor_shaped(full, shape).ok_or_else(missing)?;
            check(&host.shape, host.dtype)?;
            let (dtype, gpu_shape) = target(&host.shape, host.dtype);
            let bytes = gpu_bytes(&host, dtype, full)?;
            return Tensor::from_bytes(self.ctx, &gpu_shape, dtype, &bytes);
        }
        let (found, host_dtype) = meta.ok_or_else(missing)?;
        check(&found, host_dtype)?;
        let (dtype, gpu_shape) = target(&found, host_dtype);
        let t = Tensor::empty(self.ctx, "upload", &gpu_shape, dtype)?;
        self.write_rows(&t, full, &found, host_dtype)?;
        Ok(t)
    }

    /// Writes the stored tensor `full` (`found`, `host_dtype`) at the start of `t`, converted to `t`'s dtype,
    /// in row blocks of about [`UPLOAD_CHUNK`] bytes.
    fn write_rows(&self, t: &Tensor, full: &str, found: &[usize], host_dtype: HostDType) -> Result<()> {
        let dtype = t.dtype();
        let numel = t.numel();
        let (rows, row) = (found[0], found[1..].iter().product::<usize>());
        let stored = host_dtype.bytes(rows * row).ok_or_else(|| self.missing(full, found))?;
        let row_stored = stored / rows.max(1);
        // An even number of rows per block keeps every write offset (f16 rows, q8_0/q4_0 scales) 4-aligned.
        let per = (UPLOAD_CHUNK / row_stored.max(1)).max(2) & !1;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + per).min(rows);
            let data = self
                .src
                .tensor_bytes(full, r0 * row_stored..r1 * row_stored)
                .map_err(|e| Error::Invalid(format!("rows {r0}..{r1} of {full} from {}: {e}", self.src.label())))?;
            let block_shape: Vec<usize> = [&[r1 - r0], &found[1..]].concat();
            let host = HostTensor { dtype: host_dtype, shape: Cow::Owned(block_shape), data };
            let bytes = gpu_bytes(&host, dtype, full)?;
            if dtype.is_quantized() {
                let n = (r1 - r0) * row;
                let (quants, scales) = bytes.split_at(dtype.scales_offset(n));
                let blocks_before = r0 * row / QBLOCK;
                t.write_at(self.ctx, blocks_before * dtype.quant_bytes_per_block(), quants)?;
                t.write_at(self.ctx, dtype.scales_offset(numel) + blocks_before * 2, &scales[..n / QBLOCK * 2])?;
            } else {
                let elem = if dtype == DType::F32 { 4 } else { 2 };
                t.write_at(self.ctx, r0 * row * elem, &bytes)?;
            }
            r0 = r1;
        }
        Ok(())
    }

    /// A weight with LoRA updates merged, on the device: W + sum(coef * up @ down), then stored as the
    /// policy says (quantized on the GPU when it says q8_0/q4_0). A weight stored quantized is dequantized
    /// first, one row block at a time, and requantized after the merge.
    fn merged(&self, full: &str, shape: &[usize], role: Role, updates: &[Update<'_>]) -> Result<Tensor> {
        let host_dtype = self.src.dtype(full).ok_or_else(|| self.missing(full, shape))?;
        let (out, k) = (shape[0], shape.iter().product::<usize>() / shape[0].max(1));
        // 1. The stored weight as f32 on the device.
        let base = self.load(full, shape, role, Some(DType::F32))?.reshape(&[out, k])?;
        // 2. The updates' factors, each up scaled by its coefficient, stacked along the rank: one product.
        let rank: usize = updates.iter().map(|u| u.lora.layers[u.layer].down_shape[0]).sum();
        let (mut up, mut down) = (vec![0f32; out * rank], Vec::with_capacity(rank * k));
        let mut r0 = 0;
        for u in updates {
            let (fu, fd) = u.lora.factors(u.layer)?;
            let r = u.lora.layers[u.layer].down_shape[0];
            if fu.len() != out * r || fd.len() != r * k {
                return Err(Error::Invalid(format!("{}: the LoRA factors for {full} do not fit it", u.lora.label())));
            }
            for (o, row) in fu.chunks_exact(r).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    up[o * rank + r0 + j] = v * u.coef;
                }
            }
            down.extend_from_slice(&fd);
            r0 += r;
        }
        // 3. The sum on the device, stored in the policy's dtype.
        let up = Tensor::from_f32(self.ctx, &[out, rank], &up)?;
        let down = Tensor::from_f32(self.ctx, &[rank, k], &down)?;
        let delta = ops::matmul(self.ctx, &up, &down, ops::MatmulOpts::default())?;
        let merged = ops::add(self.ctx, &base, &delta)?;
        let (dtype, gpu_shape) = self.target(full, host_dtype, shape, role);
        ops::pack(self.ctx, &merged, dtype, &gpu_shape)
    }

    /// An embedding table with `n` rows of `values` appended (textual inversion's new tokens).
    fn extended(&self, full: &str, shape: &[usize], role: Role, values: &[f32], n: usize) -> Result<Tensor> {
        let missing = || self.missing(full, shape);
        let (found, host_dtype) = self.src.shape(full).zip(self.src.dtype(full)).ok_or_else(missing)?;
        let &[rows, dim] = shape else { return Err(missing()) };
        if role != Role::Embedding || found != [rows.saturating_sub(n), dim] || values.len() != n * dim {
            return Err(Error::Invalid(format!(
                "tensor {full} has shape {found:?}: {n} rows of {} values cannot extend it to {shape:?}",
                values.len() / n.max(1)
            )));
        }
        let (dtype, gpu_shape) = self.target(full, host_dtype, shape, role);
        if self.ctx.is_cpu() {
            let host = self.src.tensor(full).ok_or_else(missing)?;
            let mut all = host.to_f32(full)?;
            all.extend_from_slice(values);
            return Tensor::from_f32(self.ctx, shape, &all);
        }
        let t = Tensor::empty(self.ctx, "upload", &gpu_shape, dtype)?;
        self.write_rows(&t, full, &found, host_dtype)?;
        let extra = HostTensor {
            dtype: HostDType::F32,
            shape: Cow::Owned(vec![n, dim]),
            data: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
        };
        let elem = if dtype == DType::F32 { 4 } else { 2 };
        let offset = found[0] * dim * elem;
        if !offset.is_multiple_of(4) {
            return Err(Error::Invalid(format!("{full}: an odd-sized f16 table cannot take new rows")));
        }
        t.write_at(self.ctx, offset, &gpu_bytes(&extra, dtype, full)?)?;
        Ok(t)
    }

    /// The GPU dtype and shape a tensor stored as `host` gets for `role`.
    fn target(&self, full: &str, host: HostDType, shape: &[usize], role: Role) -> (DType, Vec<usize>) {
        let row: usize = shape.iter().skip(1).product();
        let matrix = matches!(role, Role::Linear | Role::Conv);
        let gpu_shape = |dtype: DType| -> Vec<usize> {
            if role == Role::Conv && dtype.is_quantized() { vec![shape[0], row] } else { shape.to_vec() }
        };
        // GGML blocks our kernels read (q8_0, q4_0) go to the GPU as they are, whatever the policy says.
        if let HostDType::Ggml(g) = host {
            let native = match g {
                GgmlDType::Q8_0 => Some(DType::Q8_0),
                GgmlDType::Q4_0 => Some(DType::Q4_0),
                _ => None,
            };
            if let Some(q) = native.filter(|_| matrix && row.is_multiple_of(QBLOCK)) {
                return (q, gpu_shape(q));
            }
        }
        let mut dtype = self.policy.dtype_for(role, row);
        // Other block types (q4_1, q5_0, q5_1 ...) become q8_0, which keeps their precision, unless the
        // policy asks for a quantized dtype of its own.
        if matches!(host, HostDType::Ggml(_)) && matrix && !dtype.is_quantized() && row.is_multiple_of(QBLOCK) {
            dtype = DType::Q8_0;
        }
        // A weight too large for one f32 binding (CLIP's token table on 128 MiB adapters) is kept in f16,
        // which every kernel reads without shader-f16.
        let limits = self.ctx.summary();
        let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let numel: usize = shape.iter().product();
        if dtype == DType::F32 && role != Role::Param && DType::F32.storage_bytes(numel) as u64 > limit {
            log::warn!("{full} {shape:?} exceeds the device's {limit}-byte binding limit in f32: stored as f16");
            dtype = DType::F16;
        }
        (dtype, gpu_shape(dtype))
    }

    /// The tensor `name` as f32 on the CPU (small tensors the CPU side needs, e.g. to check a config).
    pub fn get_host_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let full = self.full(name);
        let host = self
            .src
            .tensor(&full)
            .ok_or_else(|| Error::Invalid(format!("missing tensor {full} in {}", self.src.label())))?;
        Ok((host.shape.to_vec(), host.to_f32(&full)?))
    }
}

/// One tensor a [`write_safetensors`] call lays out: name, row-major shape, dtype (F16, F32 or BF16).
pub struct SafetensorsPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

/// A safetensors file's first bytes for `tensors` (the header's length, the JSON header padded to 8 bytes):
/// the tensors' data follows in order, unpadded.
pub fn safetensors_header(metadata: &HashMap<String, String>, tensors: &[SafetensorsPlan]) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings"));
    }
    let mut offset = 0usize;
    for t in tensors {
        let n = t.bytes();
        let info = serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + n] });
        if header.insert(t.name.clone(), info).is_some() {
            return Err(Error::Invalid(format!("two tensors are named {}", t.name)));
        }
        offset += n;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    Ok(out)
}

impl SafetensorsPlan {
    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes a safetensors file (header, then every tensor's bytes as `data(i)` produces them, one at a time:
/// the safetensors crate serializes from views of all tensors at once). Returns the bytes written.
pub fn write_safetensors(
    w: &mut impl std::io::Write,
    metadata: &HashMap<String, String>,
    tensors: &[SafetensorsPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let io = |e: std::io::Error| Error::Invalid(format!("writing the safetensors file: {e}"));
    let head = safetensors_header(metadata, tensors)?;
    w.write_all(&head).map_err(io)?;
    let mut written = head.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != t.bytes() {
            return Err(Error::Invalid(format!("{}: {} bytes of data for {}", t.name, bytes.len(), t.bytes())));
        }
        w.write_all(&bytes).map_err(io)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// The metadata key under which a converted model keeps one of its diffusers files (configs, tokenizer,
/// scheduler, preview factors), e.g. `latent_gen.file.unet/config.json`, in GGUF and safetensors files alike.
pub const EMBEDDED_FILE: &str = "latent_gen.file.";

/// The diffusers files in a safetensors header's `__metadata__` (see [`EMBEDDED_FILE`]).
fn embedded_in(metadata: &Metadata) -> HashMap<String, String> {
    metadata
        .metadata()
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.strip_prefix(EMBEDDED_FILE)?.to_string(), v.clone())))
        .collect()
}

impl Safetensors {
    /// The diffusers files a converted checkpoint carries in its metadata.
    pub fn embedded_files(&self) -> HashMap<String, String> {
        embedded_in(&self.metadata)
    }

    /// The header's `__metadata__` value for `key`.
    pub fn metadata_value(&self, key: &str) -> Option<String> {
        self.metadata.metadata().as_ref()?.get(key).cloned()
    }
}

impl RangedSafetensors {
    /// The diffusers files a converted checkpoint carries in its metadata.
    pub fn embedded_files(&self) -> HashMap<String, String> {
        embedded_in(&self.metadata)
    }

    /// The header's `__metadata__` value for `key`.
    pub fn metadata_value(&self, key: &str) -> Option<String> {
        self.metadata.metadata().as_ref()?.get(key).cloned()
    }
}

/// Tensors stored in more bytes than this are uploaded in row blocks of about this size.
pub const UPLOAD_CHUNK: usize = 4 << 20;

/// A stored tensor (or a block of its rows) in the GPU layout of `dtype`.
fn gpu_bytes(host: &HostTensor<'_>, dtype: DType, name: &str) -> Result<Vec<u8>> {
    let numel: usize = host.shape.iter().product();
    let native = match host.dtype {
        HostDType::Ggml(GgmlDType::Q8_0) => Some(DType::Q8_0),
        HostDType::Ggml(GgmlDType::Q4_0) => Some(DType::Q4_0),
        _ => None,
    };
    if native == Some(dtype) {
        return crate::gpu::quant::ggml_to_gpu(dtype, &host.data, numel);
    }
    // f16 on disk going to f16 on the GPU is copied as is.
    if dtype == DType::F16 && host.dtype == HostDType::F16 {
        return Ok(host.data.to_vec());
    }
    let data = host.to_f32(name)?;
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(&data).to_vec(),
        DType::F16 => {
            let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::Q8_0 | DType::Q4_0 => {
            let row: usize = host.shape.iter().skip(1).product();
            if host.shape.len() < 2 || !row.is_multiple_of(QBLOCK) {
                return Err(Error::Invalid(format!("{name}: rows of {row} cannot be stored as {dtype}")));
            }
            let ggml = crate::gpu::quant::quantize_ggml(dtype, &data)?;
            crate::gpu::quant::ggml_to_gpu(dtype, &ggml, numel)?
        }
    })
}

/// Made-up weights of whatever shape a model asks for (benchmarks: timing does not depend on the values).
/// Matrices are uniform in +-1/sqrt(fan_in), norm scales 1, biases 0, so activations stay finite.
pub struct RandomWeights {
    seed: std::cell::Cell<u64>,
    q4_0: bool,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed: std::cell::Cell::new(seed), q4_0: false }
    }

    /// Matrices whose rows are a multiple of 32 come as GGML q4_0 blocks (random quants, the scale of the
    /// same bound): made without quantizing anything, so a real-size model is ready in seconds, in a
    /// browser too (the diagnostics page's benchmark).
    pub fn q4_0(seed: u64) -> Self {
        Self { seed: std::cell::Cell::new(seed), q4_0: true }
    }

    fn next_seed(&self) -> u64 {
        let seed = self.seed.get();
        self.seed.set(seed.wrapping_add(1));
        seed
    }
}

impl TensorSource for RandomWeights {
    fn tensor(&self, _name: &str) -> Option<HostTensor<'_>> {
        None
    }

    fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Option<HostTensor<'_>> {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product();
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        if self.q4_0 && shape.len() >= 2 && fan_in.is_multiple_of(QBLOCK) {
            // GGML q4_0 blocks: an f16 scale, then 16 bytes of 4-bit quants (x = d * (q - 8)).
            let mut rng = crate::selfcheck::Rng::new(self.next_seed());
            let d = half::f16::from_f32(bound / 8.0).to_le_bytes();
            let quants: Vec<u8> = rng.uniform(n / 2, 0.0, 256.0).into_iter().map(|v| v as u8).collect();
            let mut data = Vec::with_capacity(n / QBLOCK * 18);
            for block in quants.chunks_exact(QBLOCK / 2) {
                data.extend_from_slice(&d);
                data.extend_from_slice(block);
            }
            return Some(HostTensor {
                dtype: HostDType::Ggml(GgmlDType::Q4_0),
                shape: Cow::Owned(shape.to_vec()),
                data: Cow::Owned(data),
            });
        }
        let data: Vec<half::f16> = if shape.len() == 1 {
            let v = if name.ends_with("bias") { 0.0 } else { 1.0 };
            vec![half::f16::from_f32(v); n]
        } else {
            let mut rng = crate::selfcheck::Rng::new(self.next_seed());
            rng.uniform(n, -bound, bound).into_iter().map(half::f16::from_f32).collect()
        };
        Some(HostTensor {
            dtype: HostDType::F16,
            shape: Cow::Owned(shape.to_vec()),
            data: Cow::Owned(bytemuck::cast_slice(&data).to_vec()),
        })
    }

    fn label(&self) -> String {
        "random weights".into()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Vec<usize>)]) -> Safetensors {
        let data: Vec<Vec<f32>> = tensors.iter().map(|(_, s)| vec![0.5; s.iter().product()]).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap(),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        Safetensors::new(Bytes::Owned(bytes), "test.safetensors").unwrap()
    }

    #[test]
    fn missing_and_misshaped_tensors_are_named() {
        let ctx = pollster::block_on(GpuContext::new()).expect("adapter");
        let src = file(&[("a.weight", vec![4, 3])]);
        let w = Weights::new(&ctx, &src, LoadPolicy::F32).pp("a");
        let e = w.get("weight", &[4, 5], Role::Linear).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("[4, 3]") && e.contains("[4, 5]"), "{e}");
        let e = w.get("bias", &[4], Role::Param).unwrap_err().to_string();
        assert!(e.contains("missing tensor a.bias") && e.contains("test.safetensors"), "{e}");
        assert!(w.get("weight", &[4, 3], Role::Linear).is_ok());
    }

    /// Tensors larger than UPLOAD_CHUNK go up in row blocks (odd row counts, conv shapes, every target dtype)
    /// and equal a whole upload; no read is larger than a block.
    #[test]
    fn large_tensors_upload_in_row_blocks() {
        let ctx = pollster::block_on(GpuContext::new()).expect("adapter");
        let mut rng = crate::selfcheck::Rng::new(3);
        let (lin, conv) = (vec![1001usize, 2560], vec![513usize, 256, 3, 3]);
        let (a, b) = (rng.uniform(lin.iter().product(), -1.0, 1.0), rng.uniform(conv.iter().product(), -1.0, 1.0));
        let h: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
        let views = vec![
            ("lin32", safetensors::tensor::TensorView::new(Dtype::F32, lin.clone(), bytemuck::cast_slice(&a)).unwrap()),
            ("lin16", safetensors::tensor::TensorView::new(Dtype::F16, lin.clone(), bytemuck::cast_slice(&h)).unwrap()),
            ("conv", safetensors::tensor::TensorView::new(Dtype::F32, conv.clone(), bytemuck::cast_slice(&b)).unwrap()),
        ];
        let bytes = std::rc::Rc::new(safetensors::serialize(views, None).unwrap());
        let biggest = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let (file, seen) = (bytes.clone(), biggest.clone());
        let read: RangeReader = std::rc::Rc::new(move |offset, len| {
            seen.set(seen.get().max(len));
            Ok(file[offset as usize..offset as usize + len].to_vec())
        });
        let src = RangedSafetensors::new(read, bytes.len() as u64, "big.safetensors").unwrap();
        assert!(src.dtype("lin32").unwrap().bytes(a.len()).unwrap() > 2 * UPLOAD_CHUNK);
        let cases = [
            ("lin32", &lin, &a, Role::Linear, DType::F32),
            ("lin32", &lin, &a, Role::Linear, DType::Q8_0),
            ("lin16", &lin, &a, Role::Linear, DType::F16),
            ("lin32", &lin, &a, Role::Linear, DType::Q4_0),
            ("conv", &conv, &b, Role::Conv, DType::Q8_0),
            ("conv", &conv, &b, Role::Conv, DType::F16),
        ];
        for (name, shape, data, role, weights) in cases {
            let w = Weights::new(&ctx, &src, LoadPolicy { act: DType::F32, weights });
            let got = w.get(name, shape, role).unwrap();
            let gpu_shape =
                if role == Role::Conv && weights.is_quantized() { vec![shape[0], 2304] } else { shape.to_vec() };
            let values = if name == "lin16" { h.iter().map(|v| v.to_f32()).collect() } else { data.clone() };
            let want = Tensor::from_f32_as(&ctx, &gpu_shape, &values, weights).unwrap();
            assert_eq!(got.shape(), want.shape(), "{name} {weights}");
            let (g, e) =
                (pollster::block_on(got.to_vec_f32(&ctx)).unwrap(), pollster::block_on(want.to_vec_f32(&ctx)).unwrap());
            assert!(g == e, "{name} as {weights}: the block-wise upload differs from a whole one");
        }
        assert!(biggest.get() <= UPLOAD_CHUNK, "a read of {} bytes", biggest.get());
    }

    #[test]
    fn truncated_files_are_refused() {
        let src = file(&[("x", vec![8])]);
        let mut bytes = src.bytes.as_ref().to_vec();
        bytes.truncate(bytes.len() - 4);
        let e = Safetensors::new(Bytes::Owned(bytes), "cut.safetensors")
            .err()
            .expect("a truncated file is refused")
            .to_string();
        assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
        let e =
            Safetensors::new(Bytes::Owned(b"not a model".to_vec()), "junk").err().expect("junk is refused").to_string();
        assert!(e.contains("junk"), "{e}");
    }

    /// Named tensors in memory, in any stored dtype.
    struct Mem(HashMap<String, (HostDType, Vec<usize>, Vec<u8>)>);

    impl TensorSource for Mem {
        fn tensor(&self, name: &str) -> Option<HostTensor<'_>> {
            let (dtype, shape, data) = self.0.get(name)?;
            Some(HostTensor { dtype: *dtype, shape: Cow::Borrowed(shape), data: Cow::Borrowed(data) })
        }

        fn names(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }

        fn label(&self) -> String {
            "memory".into()
        }
    }

    /// LoRA updates merge on the device, then take the policy's dtype there: equal to merging on the host and
    /// converting there (half's f16, candle's q8_0/q4_0 blocks), for an f32 weight, for a q8_0 one from a GGUF
    /// (dequantized, merged, requantized) and on the CPU fallback.
    #[test]
    fn lora_updates_merge_before_quantizing() {
        let gpu = pollster::block_on(GpuContext::new()).expect("adapter");
        // The second weight is over UPLOAD_CHUNK in f32: read and dequantized in row blocks.
        for (out, k) in [(64usize, 96usize), (1040, 1152)] {
            let (r, scale) = (4usize, 0.7f32);
            let mut rng = crate::selfcheck::Rng::new(11);
            let (w, up, down) =
                (rng.uniform(out * k, -1.0, 1.0), rng.uniform(out * r, -1.0, 1.0), rng.uniform(r * k, -1.0, 1.0));
            let views = vec![
                (
                    "lora_unet_lin.lora_down.weight",
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![r, k], bytemuck::cast_slice(&down)).unwrap(),
                ),
                (
                    "lora_unet_lin.lora_up.weight",
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![out, r], bytemuck::cast_slice(&up)).unwrap(),
                ),
                (
                    "lora_unet_lin.alpha",
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![], bytemuck::cast_slice(&[2.0f32])).unwrap(),
                ),
            ];
            let lora = lora::Lora::from_bytes("lin", safetensors::serialize(views, None).unwrap()).unwrap();
            assert_eq!(lora.layers[0].scaling, 0.5);
            let coef = scale * lora.layers[0].scaling;
            let mut patch = Patch::default();
            patch.lora.insert("lin.weight".into(), vec![Update { lora: &lora, layer: 0, coef }]);
            let merged_with = |base: &[f32]| -> Vec<f32> {
                (0..out * k)
                    .map(|i| base[i] + coef * (0..r).map(|j| up[i / k * r + j] * down[j * k + i % k]).sum::<f32>())
                    .collect()
            };
            let q8 = crate::gpu::quant::quantize_ggml(DType::Q8_0, &w).unwrap();
            let sources = [
                ("f32", HostDType::F32, bytemuck::cast_slice(&w).to_vec()),
                ("q8_0 GGUF", HostDType::Ggml(GgmlDType::Q8_0), q8),
            ];
            for (what, host_dtype, bytes) in sources {
                let src = Mem(HashMap::from([("lin.weight".to_string(), (host_dtype, vec![out, k], bytes))]));
                let stored = src.tensor("lin.weight").unwrap().to_f32("lin.weight").unwrap();
                let merged = merged_with(&stored);
                for weights in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0] {
                    let policy = LoadPolicy { act: DType::F32, weights };
                    let got =
                        Weights::new(&gpu, &src, policy).with_patch(&patch).get("lin.weight", &[out, k], Role::Linear);
                    let got = pollster::block_on(got.unwrap().to_vec_f32(&gpu)).unwrap();
                    // A GGUF's q8_0 stays q8_0 whatever the policy says.
                    let dtype = if host_dtype == HostDType::F32 { weights } else { DType::Q8_0 };
                    let want = pollster::block_on(
                        Tensor::from_f32_as(&gpu, &[out, k], &merged, dtype).unwrap().to_vec_f32(&gpu),
                    )
                    .unwrap();
                    let step = if dtype == DType::Q4_0 { 0.5 } else { 0.05 };
                    let tol = |w: f32| match dtype {
                        DType::F32 => 1e-5,
                        DType::F16 => 1e-3 * w.abs().max(1e-3),
                        _ => step,
                    };
                    let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
                    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / tol(*w)).fold(0.0f32, f32::max);
                    assert!(worst <= 1.0, "{what} as {dtype}: off by {worst} tolerances");
                    if dtype.is_quantized() {
                        assert!(
                            differ * 1000 <= got.len(),
                            "{what} as {dtype}: {differ} values differ from the host's"
                        );
                    }
                    let unmerged = pollster::block_on(
                        Tensor::from_f32_as(&gpu, &[out, k], &stored, dtype).unwrap().to_vec_f32(&gpu),
                    )
                    .unwrap();
                    assert!(got != unmerged, "{what} as {dtype}: nothing was merged");
                }
            }
            // The CPU fallback merges in f32.
            let cpu = GpuContext::cpu();
            let src = Mem(HashMap::from([(
                "lin.weight".to_string(),
                (HostDType::F32, vec![out, k], bytemuck::cast_slice(&w).to_vec()),
            )]));
            let got = Weights::new(&cpu, &src, LoadPolicy::F32)
                .with_patch(&patch)
                .get("lin.weight", &[out, k], Role::Linear)
                .unwrap();
            let got = pollster::block_on(got.to_vec_f32(&cpu)).unwrap();
            let want = merged_with(&w);
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "CPU merge off by {worst}");
        }
    }

    /// Textual inversion's rows follow the stored table, on the device (f32 and f16) and on the CPU.
    #[test]
    fn embedding_tables_take_new_rows() {
        let gpu = pollster::block_on(GpuContext::new()).expect("adapter");
        let (rows, dim, n) = (300usize, 8usize, 3usize);
        let mut rng = crate::selfcheck::Rng::new(12);
        let (table, extra) = (rng.uniform(rows * dim, -1.0, 1.0), rng.uniform(n * dim, -1.0, 1.0));
        let src = Mem(HashMap::from([(
            "t.weight".to_string(),
            (HostDType::F32, vec![rows, dim], bytemuck::cast_slice(&table).to_vec()),
        )]));
        let mut patch = Patch::default();
        patch.rows.insert("t.weight".into(), (extra.clone(), n));
        let want: Vec<f32> = table.iter().chain(&extra).copied().collect();
        for (ctx, weights) in [(&gpu, DType::F32), (&gpu, DType::F16), (&GpuContext::cpu(), DType::F32)] {
            let policy = LoadPolicy { act: DType::F32, weights };
            let t = Weights::new(ctx, &src, policy)
                .with_patch(&patch)
                .get("t.weight", &[rows + n, dim], Role::Embedding)
                .unwrap();
            assert_eq!(t.shape(), [rows + n, dim]);
            let got = pollster::block_on(t.to_vec_f32(ctx)).unwrap();
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= if weights == DType::F16 { 1e-3 } else { 0.0 }, "{weights}: off by {worst}");
        }
        let e = Weights::new(&gpu, &src, LoadPolicy::F32).with_patch(&patch).get(
            "t.weight",
            &[rows + n + 1, dim],
            Role::Embedding,
        );
        assert!(e.unwrap_err().to_string().contains("cannot extend"));
    }
}
