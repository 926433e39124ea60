//! Conversions between GGML's block layouts (as in GGUF files and candle's `QTensor`) and the GPU layout
//! described in [`super::dtype`]: all quants first, then all f16 scales.

use candle_core::quantized::{GgmlDType, QTensor};

use super::dtype::{DType, QBLOCK};
use crate::error::{Error, Result};

fn ggml_dtype(dtype: DType) -> Result<GgmlDType> {
    match dtype {
        DType::Q8_0 => Ok(GgmlDType::Q8_0),
        DType::Q4_0 => Ok(GgmlDType::Q4_0),
        DType::F32 | DType::F16 => Err(Error::Invalid(format!("{dtype} is not a block-quantized dtype"))),
    }
}

/// Quantizes `data` (rows along the last dimension, a multiple of 32) to GGML blocks with candle.
pub fn quantize_ggml(dtype: DType, data: &[f32]) -> Result<Vec<u8>> {
    let t = candle_core::Tensor::from_slice(data, data.len(), &candle_core::Device::Cpu)?;
    let q = QTensor::quantize(&t, ggml_dtype(dtype)?)?;
    Ok(q.data()?.into_owned())
}

/// Splits GGML blocks (`[f16 d][quants]` repeated) into the GPU layout (`[all quants][all d]`).
pub fn ggml_to_gpu(dtype: DType, ggml: &[u8], numel: usize) -> Result<Vec<u8>> {
    let qbytes = dtype.quant_bytes_per_block();
    let block = 2 + qbytes;
    let blocks = numel / QBLOCK;
    if !numel.is_multiple_of(QBLOCK) || ggml.len() != blocks * block {
        return Err(Error::Invalid(format!(
            "{dtype} data for {numel} elements must be {} bytes in blocks of {block}, got {}",
            blocks * block,
            ggml.len()
        )));
    }
    let mut out = vec![0u8; dtype.storage_bytes(numel)];
    let (quants, scales) = out.split_at_mut(dtype.scales_offset(numel));
    for (i, b) in ggml.chunks_exact(block).enumerate() {
        scales[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
        quants[i * qbytes..(i + 1) * qbytes].copy_from_slice(&b[2..]);
    }
    Ok(out)
}

/// Dequantizes the GPU layout back to f32 (for readback and tests).
pub fn dequantize_gpu(dtype: DType, bytes: &[u8], numel: usize) -> Vec<f32> {
    let qbytes = dtype.quant_bytes_per_block();
    let (quants, scales) = bytes.split_at(dtype.scales_offset(numel));
    let mut out = Vec::with_capacity(numel);
    for blk in 0..numel / QBLOCK {
        let d = half::f16::from_le_bytes([scales[2 * blk], scales[2 * blk + 1]]).to_f32();
        let q = &quants[blk * qbytes..(blk + 1) * qbytes];
        match dtype {
            DType::Q8_0 => out.extend(q.iter().map(|&v| d * (v as i8) as f32)),
            _ => {
                out.extend(q.iter().map(|&v| d * ((v & 15) as f32 - 8.0)));
                out.extend(q.iter().map(|&v| d * ((v >> 4) as f32 - 8.0)));
            }
        }
    }
    out
}
