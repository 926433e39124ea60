//! The WebGPU runtime: context (adapter, limits, features), pooled buffers, cached pipelines, command
//! batching, the tensor type and readback. Models never touch wgpu; they call `ops`, which call this.

mod batch;
mod context;
mod dispatch;
mod dtype;
mod pipeline;
mod pool;
pub mod quant;
mod tensor;

pub use context::{AdapterSummary, GpuContext};
pub use dispatch::grid_1d;
pub use dtype::{DType, QBLOCK};
pub use pipeline::{Kernel, Spec};
pub use pool::PoolStats;
pub use tensor::Tensor;
