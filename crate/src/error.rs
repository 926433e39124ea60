//! The crate's one error type. Every failure a user can hit (no adapter, a shape an op can't take, a tensor
//! over the device's limits, a GPU validation or out-of-memory error) is a value, never a panic.

/// Everything that can go wrong in latent-gen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No WebGPU adapter: the browser lacks WebGPU, or natively no Vulkan/Metal/DX12 driver was found.
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    /// The adapter was found but refused to create a device.
    #[error("the GPU refused to create a device: {0}")]
    RequestDevice(String),
    /// An op was given operands whose shapes it cannot combine.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// An op was given an operand in a dtype it has no kernel for.
    #[error("{op}: unsupported dtype {dtype}{detail}")]
    DType { op: &'static str, dtype: crate::gpu::DType, detail: String },
    /// A tensor would exceed a device limit (buffer size, binding size, dispatch size).
    #[error("{op}: {what} needs {needed} but the device allows at most {limit} ({shape})")]
    Limit { op: &'static str, what: &'static str, needed: u64, limit: u64, shape: String },
    /// A kernel needs a device feature this adapter lacks (e.g. shader-f16).
    #[error("{op}: the device lacks the {feature} feature")]
    MissingFeature { op: &'static str, feature: &'static str },
    /// wgpu reported an error (validation, out of memory, device lost).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The GPU device was lost (a driver reset, the GPU process crashing, the device destroyed): nothing on it
    /// can be used any more; a new context (and the model loaded again) is needed.
    #[error("the GPU device was lost ({0}); a new one is needed")]
    DeviceLost(String),
    /// Reading a buffer back from the GPU failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
    /// An error from candle (the CPU side: reference computations, weight formats, CPU fallback).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A model produced NaN or infinite values (damaged weights, f16 overflow, an extreme guidance): the
    /// message names where and what usually helps.
    #[error("{0}")]
    NonFinite(String),
    /// The caller cancelled (between denoising steps).
    #[error("cancelled")]
    Cancelled,
    /// Bad arguments that are not about shapes (e.g. an empty tensor, a group count that does not divide).
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for a shape error naming the op.
pub(crate) fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape { op, msg: msg.into() })
}
