//! One launcher per kernel family. Each checks its operands' shapes and dtypes, returning an error that names
//! the op and the shapes, allocates its output from the pool and records the dispatch into the batch.
//! Ops never know which model calls them.

pub mod attention;
pub mod check;
pub(crate) mod cpu;
mod cpu_kernels;
pub mod elementwise;
pub mod gemm;
pub mod layout;
pub mod norm;
pub mod pack;

pub use attention::{Cols, attention, attention_cols};
pub use check::{FiniteCheck, all_finite};
pub use cpu::profile as cpu_profile;
pub use cpu_kernels::threads as cpu_threads;
pub use elementwise::{
    Activation, BinaryOp, Term, add, affine, geglu, gelu, lincomb, mul, quick_gelu, relu, silu, soft_clamp, sub,
};
pub use gemm::{
    Conv2dOpts, GnInput, LnParams, MatmulOpts, Tile, conv2d, linear, linear_act, linear_with, matmul, split_k_chunks,
};
pub use layout::{
    TimestepEmbedding, cast, concat, embedding, nchw_to_tokens, timestep_embedding, tokens_to_nchw, transpose_last2,
    upsample_nearest2x,
};
pub use norm::{GnParams, group_norm, group_norm_cat, group_norm_stats, layer_norm, softmax};
pub use pack::pack;

use crate::error::{Error, Result};
use crate::gpu::{DType, Tensor};

/// Checks that `ts` are activations (f32 or f16) of one dtype.
pub(crate) fn check_act(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let first = ts[0].dtype();
    for t in ts {
        if !matches!(t.dtype(), DType::F32 | DType::F16) {
            return Err(Error::DType {
                op,
                dtype: t.dtype(),
                detail: format!(" for an activation {:?} (activations are f32 or f16)", t.shape()),
            });
        }
        if t.dtype() != first {
            return Err(Error::DType {
                op,
                dtype: t.dtype(),
                detail: format!(": operands mix {first} and {}", t.dtype()),
            });
        }
    }
    Ok(())
}

/// Whether the activation kernels run in f16 for this tensor.
pub(crate) fn act_dtype(t: &Tensor) -> Result<bool> {
    Ok(t.dtype() == DType::F16)
}
