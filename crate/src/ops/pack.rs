//! Storing f32 values in a weight dtype on the GPU (f16 pairs, GGML's q8_0 / q4_0 blocks): the last step of a
//! weight computed on the GPU, e.g. a LoRA merged into it, so it never travels back to the host.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result, shape_err};
use crate::gpu::{DType, GpuContext, Kernel, QBLOCK, Spec, Tensor, grid_1d};

const PACK: Kernel =
    Kernel { name: "pack", sources: &[include_str!("../kernels/pack.wgsl")], entry: "main", inputs: 1, outputs: 1 };

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    words: u32,
    qwords: u32,
    _pad: u32,
}

/// `x` (f32) stored as `dtype` with `shape` (the same number of elements): f32 is a reshape, f16 packs pairs
/// (no shader-f16 needed), q8_0 and q4_0 quantize blocks of 32 along the last dimension as GGML does. On the
/// CPU fallback, which keeps every tensor in f32, the values are returned as they are.
pub fn pack(ctx: &GpuContext, x: &Tensor, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    const OP: &str = "pack";
    let n: usize = shape.iter().product();
    if x.dtype() != DType::F32 || x.numel() != n {
        return shape_err(OP, format!("takes f32 values of {shape:?}, got {x:?}"));
    }
    if dtype.is_quantized() && shape.last().is_none_or(|d| d % QBLOCK != 0) {
        return Err(Error::DType { op: OP, dtype, detail: format!(": rows of {shape:?} are not whole blocks") });
    }
    if ctx.is_cpu() || dtype == DType::F32 {
        return x.reshape(shape);
    }
    let out = Tensor::empty(ctx, OP, shape, dtype)?;
    let (kind, words, qwords) = match dtype {
        DType::F16 => (0, n.div_ceil(2), 0),
        DType::Q8_0 => (1, (n / QBLOCK).div_ceil(2), dtype.scales_offset(n) / 4),
        _ => (2, (n / QBLOCK).div_ceil(2), dtype.scales_offset(n) / 4),
    };
    let params = Params { n: n as u32, words: words as u32, qwords: qwords as u32, _pad: 0 };
    let spec = Spec::new(false).u32("KIND", kind);
    let groups = grid_1d(ctx, (words as u32).div_ceil(64));
    ctx.dispatch(OP, &PACK, &spec, bytemuck::bytes_of(&params), &[x], &[&out], groups)?;
    Ok(out)
}
