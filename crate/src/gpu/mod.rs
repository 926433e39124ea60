//! The WebGPU runtime: context (adapter, limits, features), pooled buffers, cached pipelines, command
//! batching, the tensor type and readback. Models never touch wgpu; they call `ops`, which call this.

mod batch;
mod bindings;
mod context;
mod cost;
mod dispatch;
mod dtype;
mod pipeline;
mod pool;
pub mod quant;
mod tensor;

pub use context::{AdapterSummary, ContextOptions, CoopConfig, GpuContext, Tuning};
pub use cost::{CostReport, OpCost};

/// Shared ownership: `Arc` natively (a context may cross threads), `Rc` on wasm32, where wgpu's browser types
/// are neither `Send` nor `Sync`.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) type Ref<T> = std::sync::Arc<T>;
#[cfg(target_arch = "wasm32")]
pub(crate) type Ref<T> = std::rc::Rc<T>;
pub use dispatch::grid_1d;
pub use dtype::{DType, QBLOCK};
pub use pipeline::{Kernel, KernelSource, Spec};
pub use pool::PoolStats;
pub use tensor::Tensor;
