//! Non-finite detection: one small kernel per checked tensor sets a bit in a 4-byte flag, which is read back
//! once (instead of reading back the tensors). The pipeline checks the text embeddings, every step's latent
//! and the decoded image, so a NaN or an overflow stops a generation with a message instead of a black image.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, Kernel, Spec, Tensor};

const FINITE: Kernel =
    Kernel { name: "finite", sources: &[include_str!("../kernels/finite.wgsl")], entry: "main", inputs: 1, outputs: 1 };

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    half: u32,
    bit: u32,
    _pad: u32,
}

/// A set of flags, one bit per checked tensor: which of them held a NaN or an infinity.
pub struct FiniteCheck {
    /// The GPU flag word (None on the CPU fallback, which checks as it goes).
    flag: Option<Tensor>,
    cpu_bits: u32,
}

impl FiniteCheck {
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        let flag = if ctx.is_cpu() { None } else { Some(Tensor::from_bytes(ctx, &[1], DType::F32, &[0; 4])?) };
        Ok(Self { flag, cpu_bits: 0 })
    }

    /// Records a check of `x` (f32 or f16 activations) under `bit` (0..32).
    pub fn check(&mut self, ctx: &GpuContext, x: &Tensor, bit: u32) -> Result<()> {
        if bit >= 32 {
            return Err(Error::Invalid(format!("finite: flag bit {bit} is out of range")));
        }
        let half = match x.dtype() {
            DType::F32 => 0,
            DType::F16 => 1,
            d => return Err(Error::DType { op: "finite", dtype: d, detail: " (checks activations)".into() }),
        };
        let Some(flag) = &self.flag else {
            let finite = x.cpu()?.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
            if !finite {
                self.cpu_bits |= 1 << bit;
            }
            return Ok(());
        };
        let n = x.numel();
        let words = if half == 1 { n.div_ceil(2) } else { n };
        let groups = (words.div_ceil(256) as u32).clamp(1, 256);
        let params = Params { n: n as u32, half, bit, _pad: 0 };
        ctx.dispatch("finite", &FINITE, &Spec::new(false), bytemuck::bytes_of(&params), &[x], &[flag], [groups, 1, 1])
    }

    /// The bits of the checks that found a NaN or an infinity (reads 4 bytes back: a sync point).
    pub async fn bad_bits(&self, ctx: &GpuContext) -> Result<u32> {
        match &self.flag {
            None => Ok(self.cpu_bits),
            Some(flag) => {
                let bytes = flag.to_bytes(ctx).await?;
                Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            }
        }
    }
}

/// Whether every value of `x` is finite (one check, read back at once).
pub async fn all_finite(ctx: &GpuContext, x: &Tensor) -> Result<bool> {
    let mut c = FiniteCheck::new(ctx)?;
    c.check(ctx, x, 0)?;
    Ok(c.bad_bits(ctx).await? == 0)
}
