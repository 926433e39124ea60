//! latent-gen: text-to-image latent diffusion on WebGPU, in the browser (wasm32) and natively.
//!
//! Layers, each calling only the one below: [`gpu`] (device, buffers, pipelines, tensors) <- [`ops`] (one
//! launcher per kernel family, WGSL in `kernels/`) <- models and pipeline. [`selfcheck`] holds the kernel
//! checks against candle's CPU results, shared by the native tests, the browser tests and the diagnostics page.

pub mod bench;
pub mod checkpoint;
pub mod compose;
pub mod convert;
pub mod error;
pub mod gpu;
pub mod image;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod rng;
pub mod schedulers;
pub mod selfcheck;
pub mod tokenizer;
#[cfg(target_arch = "wasm32")]
pub mod web;
pub mod weights;

pub use error::{Error, Result};
