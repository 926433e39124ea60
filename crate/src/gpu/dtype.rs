//! Element types of GPU tensors and how each is laid out in a buffer.
//!
//! Activations are `F32` or `F16`. Weights may also be `F16` (read as packed pairs with `unpack2x16float`, so
//! no shader-f16 is needed) or block-quantized like GGML's `q8_0` / `q4_0`. GGML packs a block as its f16
//! scale followed by the quants, which leaves blocks 2-byte aligned; here all blocks' quants come first (so
//! every block's quants start on a 4-byte boundary and load as u32) and all scales follow, packed two per u32.

use serde::Serialize;

/// Elements per quantization block (GGML's QK8_0 and QK4_0).
pub const QBLOCK: usize = 32;

/// The element type of a GPU tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DType {
    F32,
    F16,
    /// Blocks of 32 int8 quants with one f16 scale: x = d * q.
    Q8_0,
    /// Blocks of 32 4-bit quants with one f16 scale: x = d * (q - 8). Byte j of a block holds element j in its
    /// low nibble and element j + 16 in its high nibble, as in GGML.
    Q4_0,
}

impl DType {
    /// Whether this dtype stores blocks of [`QBLOCK`] elements along the last dimension.
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0)
    }

    /// The name used in kernels, benchmark output and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
        }
    }

    /// Bytes of quants per block (quantized dtypes only).
    pub fn quant_bytes_per_block(self) -> usize {
        match self {
            DType::Q8_0 => QBLOCK,
            DType::Q4_0 => QBLOCK / 2,
            DType::F32 | DType::F16 => 0,
        }
    }

    /// Byte offset of the scales region in a quantized buffer holding `numel` elements.
    pub fn scales_offset(self, numel: usize) -> usize {
        numel / QBLOCK * self.quant_bytes_per_block()
    }

    /// Bytes a buffer needs to hold `numel` elements, rounded up to a multiple of 4.
    pub fn storage_bytes(self, numel: usize) -> usize {
        let raw = match self {
            DType::F32 => numel * 4,
            DType::F16 => numel * 2,
            DType::Q8_0 | DType::Q4_0 => self.scales_offset(numel) + numel / QBLOCK * 2,
        };
        raw.div_ceil(4) * 4
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
