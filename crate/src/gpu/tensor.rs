//! The tensor: a pooled GPU buffer with a shape and a dtype, or on the CPU fallback a candle tensor.
//! Cloning shares the data.

use super::Ref;
use super::context::GpuContext;
use super::dtype::{DType, QBLOCK};
use super::pool::PooledBuffer;
use super::quant;
use crate::error::{Error, Result};

/// A tensor in GPU memory (or CPU memory on the CPU fallback), row-major (the last dimension is contiguous).
#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    dtype: DType,
}

#[derive(Clone)]
enum Storage {
    Gpu(Ref<PooledBuffer>),
    /// f32, contiguous, of the tensor's shape.
    Cpu(candle_core::Tensor),
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}

impl Tensor {
    /// An uninitialized tensor for `op`'s output; errors if it would exceed the device's buffer limits.
    pub fn empty(ctx: &GpuContext, op: &'static str, shape: &[usize], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if ctx.is_cpu() {
            let t = candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)?;
            return Ok(Self::from_cpu(t));
        }
        if dtype.is_quantized() && shape.last().is_none_or(|d| d % QBLOCK != 0) {
            return Err(Error::Shape {
                op,
                msg: format!("a {dtype} tensor needs a last dimension that is a multiple of {QBLOCK}, got {shape:?}"),
            });
        }
        let bytes = dtype.storage_bytes(numel) as u64;
        let limits = ctx.limits();
        let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if bytes > limit {
            return Err(Error::Limit {
                op,
                what: "a tensor buffer",
                needed: bytes,
                limit,
                shape: format!("{shape:?} {dtype}"),
            });
        }
        let shared = ctx.shared()?;
        let buf = shared.pool.alloc(&shared.device, bytes, limits.max_buffer_size);
        Ok(Self { storage: Storage::Gpu(Ref::new(buf)), shape: shape.to_vec(), dtype })
    }

    /// Wraps an f32 candle tensor (the CPU fallback's storage).
    pub fn from_cpu(t: candle_core::Tensor) -> Self {
        let shape = t.dims().to_vec();
        Self { storage: Storage::Cpu(t), shape, dtype: DType::F32 }
    }

    /// The candle tensor of a CPU-fallback tensor.
    pub fn cpu(&self) -> Result<&candle_core::Tensor> {
        match &self.storage {
            Storage::Cpu(t) => Ok(t),
            Storage::Gpu(_) => Err(Error::Invalid("a GPU tensor was given to the CPU fallback".into())),
        }
    }

    /// Uploads raw bytes already in the GPU layout of `dtype`.
    pub fn from_bytes(ctx: &GpuContext, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Self> {
        if ctx.is_cpu() {
            let numel: usize = shape.iter().product();
            if bytes.len().div_ceil(4) * 4 != dtype.storage_bytes(numel) {
                return Err(Error::Invalid(format!(
                    "upload: {shape:?} {dtype} takes {} bytes, got {}",
                    dtype.storage_bytes(numel),
                    bytes.len()
                )));
            }
            let data = match dtype {
                DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
                DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes).iter().map(|h| h.to_f32()).collect(),
                DType::Q8_0 | DType::Q4_0 => quant::dequantize_gpu(dtype, bytes, numel),
            };
            let t = candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?;
            return Ok(Self::from_cpu(t));
        }
        let t = Self::empty(ctx, "upload", shape, dtype)?;
        let want = dtype.storage_bytes(t.numel());
        if bytes.len() != want && bytes.len().div_ceil(4) * 4 != want {
            return Err(Error::Invalid(format!("upload: {shape:?} {dtype} takes {want} bytes, got {}", bytes.len())));
        }
        // Queue writes land before the batch's recorded commands, and the pooled buffer may still be read
        // by them under its previous owner: submit those first.
        ctx.flush()?;
        let mut padded;
        let data = if bytes.len().is_multiple_of(4) {
            bytes
        } else {
            padded = bytes.to_vec();
            padded.resize(want, 0);
            &padded
        };
        if !data.is_empty() {
            ctx.shared()?.queue.write_buffer(t.gpu_buffer()?, 0, data);
        }
        Ok(t)
    }

    /// Writes `bytes` (already in this tensor's GPU layout) at byte `offset` of its buffer: large weights are
    /// uploaded in pieces. `offset` must be a multiple of 4; `bytes` is zero-padded to one.
    pub fn write_at(&self, ctx: &GpuContext, offset: usize, bytes: &[u8]) -> Result<()> {
        let end = offset + bytes.len().div_ceil(4) * 4;
        if !offset.is_multiple_of(4) || end as u64 > self.byte_len() {
            return Err(Error::Invalid(format!(
                "upload: {} bytes at offset {offset} do not fit a {:?} {} buffer of {} bytes",
                bytes.len(),
                self.shape,
                self.dtype,
                self.byte_len()
            )));
        }
        // As in from_bytes: commands already recorded may still read this pooled buffer.
        ctx.flush()?;
        let queue = &ctx.shared()?.queue;
        if bytes.len().is_multiple_of(4) {
            queue.write_buffer(self.gpu_buffer()?, offset as u64, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            queue.write_buffer(self.gpu_buffer()?, offset as u64, &padded);
        }
        Ok(())
    }

    /// Uploads f32 data, converting to `dtype` (f16, or quantized to q8_0/q4_0 blocks with candle).
    pub fn from_f32_as(ctx: &GpuContext, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::Invalid(format!("upload: shape {shape:?} needs {numel} values, got {}", data.len())));
        }
        match dtype {
            DType::F32 => Self::from_bytes(ctx, shape, dtype, bytemuck::cast_slice(data)),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
                Self::from_bytes(ctx, shape, dtype, bytemuck::cast_slice(&h))
            }
            DType::Q8_0 | DType::Q4_0 => {
                if shape.last().is_none_or(|d| d % QBLOCK != 0) {
                    return Err(Error::Shape {
                        op: "upload",
                        msg: format!(
                            "a {dtype} tensor needs a last dimension that is a multiple of {QBLOCK}, got {shape:?}"
                        ),
                    });
                }
                let ggml = quant::quantize_ggml(dtype, data)?;
                Self::from_ggml(ctx, shape, dtype, &ggml)
            }
        }
    }

    /// Uploads f32 data.
    pub fn from_f32(ctx: &GpuContext, shape: &[usize], data: &[f32]) -> Result<Self> {
        Self::from_f32_as(ctx, shape, data, DType::F32)
    }

    /// Uploads quantized data in GGML's block layout (as stored in GGUF files).
    pub fn from_ggml(ctx: &GpuContext, shape: &[usize], dtype: DType, ggml: &[u8]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let bytes = quant::ggml_to_gpu(dtype, ggml, numel)?;
        Self::from_bytes(ctx, shape, dtype, &bytes)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of dimension `i`, counted from the end when negative.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[(if i < 0 { r + i } else { i }) as usize]
    }

    /// Bytes of the tensor's data (the buffer may be larger: it comes from a size class).
    pub fn byte_len(&self) -> u64 {
        self.dtype.storage_bytes(self.numel()) as u64
    }

    /// The GPU buffer (None on the CPU fallback).
    pub fn buffer(&self) -> Option<&wgpu::Buffer> {
        match &self.storage {
            Storage::Gpu(b) => Some(b.buffer()),
            Storage::Cpu(_) => None,
        }
    }

    pub(crate) fn gpu_buffer(&self) -> Result<&wgpu::Buffer> {
        self.buffer().ok_or_else(|| Error::Invalid("a CPU-fallback tensor was given to a GPU kernel".into()))
    }

    /// The same data with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() || (self.dtype.is_quantized() && shape.last() != self.shape.last()) {
            return Err(Error::Shape {
                op: "reshape",
                msg: format!("cannot view {:?} {} as {shape:?}", self.shape, self.dtype),
            });
        }
        let storage = match &self.storage {
            Storage::Gpu(b) => Storage::Gpu(b.clone()),
            Storage::Cpu(t) => Storage::Cpu(t.reshape(shape)?),
        };
        Ok(Self { storage, shape: shape.to_vec(), dtype: self.dtype })
    }

    /// Byte ranges (offset, length) of the regions a tensor of `dtype` and `numel` elements keeps: the
    /// elements, or a quantized tensor's quants and its scales. Row-stacking stacks each region.
    fn regions(dtype: DType, numel: usize) -> [(usize, usize); 2] {
        match dtype {
            DType::F32 => [(0, numel * 4), (0, 0)],
            DType::F16 => [(0, numel * 2), (0, 0)],
            DType::Q8_0 | DType::Q4_0 => {
                let q = dtype.scales_offset(numel);
                [(0, q), (q, numel / QBLOCK * 2)]
            }
        }
    }

    /// Whether [`Tensor::concat_rows`] can stack `parts`: 2-D, one dtype, one row length, and every part's
    /// regions a whole number of 4-byte words (buffer copies move words).
    pub fn can_concat_rows(parts: &[&Tensor]) -> bool {
        let Some(first) = parts.first() else { return false };
        parts.iter().all(|t| {
            t.rank() == 2
                && t.dim(1) == first.dim(1)
                && t.dtype == first.dtype
                && Self::regions(t.dtype, t.numel()).iter().all(|(o, n)| o % 4 == 0 && n % 4 == 0)
        })
    }

    /// Stacks 2-D tensors of one dtype and row length along their rows, with buffer copies (no kernel):
    /// how layers that read the same input become one matmul (attention's q, k and v projections, every
    /// ResNet's time-embedding projection). Check [`Tensor::can_concat_rows`] first.
    pub fn concat_rows(ctx: &GpuContext, parts: &[&Tensor]) -> Result<Tensor> {
        if !Self::can_concat_rows(parts) {
            let shapes: Vec<_> = parts.iter().map(|t| format!("{:?} {}", t.shape, t.dtype)).collect();
            return Err(Error::Shape { op: "concat_rows", msg: format!("cannot stack {shapes:?}") });
        }
        let rows: usize = parts.iter().map(|t| t.dim(0)).sum();
        let (cols, dtype) = (parts[0].dim(1), parts[0].dtype);
        if ctx.is_cpu() {
            let cpu: Vec<&candle_core::Tensor> = parts.iter().map(|t| t.cpu()).collect::<Result<_>>()?;
            return Ok(Self::from_cpu(candle_core::Tensor::cat(&cpu, 0)?));
        }
        let out = Self::empty(ctx, "concat_rows", &[rows, cols], dtype)?;
        let dst = Self::regions(dtype, rows * cols);
        let shared = ctx.shared()?;
        let mut batch = shared.batch.lock().unwrap_or_else(|p| p.into_inner());
        let encoder = batch.encoder(&shared.device);
        let mut at = [0usize; 2];
        for t in parts {
            for (r, (offset, len)) in Self::regions(dtype, t.numel()).into_iter().enumerate() {
                if len > 0 {
                    let to = (dst[r].0 + at[r]) as u64;
                    encoder.copy_buffer_to_buffer(t.gpu_buffer()?, offset as u64, out.gpu_buffer()?, to, len as u64);
                }
                at[r] += len;
            }
        }
        Ok(out)
    }

    /// Copies the tensor's bytes (in the GPU layout) back to the CPU.
    pub async fn to_bytes(&self, ctx: &GpuContext) -> Result<Vec<u8>> {
        if let Storage::Cpu(t) = &self.storage {
            return Ok(bytemuck::cast_slice(&t.flatten_all()?.to_vec1::<f32>()?).to_vec());
        }
        let size = self.byte_len();
        if size == 0 {
            return Ok(Vec::new());
        }
        let shared = ctx.shared()?;
        let staging = shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("latent-gen readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut batch = shared.batch.lock().unwrap_or_else(|p| p.into_inner());
            batch.encoder(&shared.device).copy_buffer_to_buffer(self.gpu_buffer()?, 0, &staging, 0, size);
            batch.flush(&shared.device, &shared.queue);
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.poll_wait()?;
        let mapped = rx.await.map_err(|_| Error::Readback("the device was lost before the map finished".into()));
        ctx.take_uncaptured()?;
        mapped?.map_err(|e| Error::Readback(e.to_string()))?;
        let data = staging.slice(..).get_mapped_range().map_err(|e| Error::Readback(e.to_string()))?.to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Reads the tensor back as f32 (f16 converted, quantized dequantized).
    pub async fn to_vec_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let bytes = self.to_bytes(ctx).await?;
        let n = self.numel();
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)[..n].to_vec(),
            DType::F16 => {
                bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)[..n].iter().map(|h| h.to_f32()).collect()
            }
            DType::Q8_0 | DType::Q4_0 => quant::dequantize_gpu(self.dtype, &bytes, n),
        })
    }
}
