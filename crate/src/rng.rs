//! Random numbers that reproduce PyTorch's CPU generator, so a seed gives the same initial noise (and the
//! same ancestral noise) as `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` in
//! diffusers. Follows ATen's `normal_kernel` (aten/src/ATen/native/cpu/DistributionTemplates.h) and
//! `uniform_real` (core/TransformationHelper.h): see ../shared/research/torch-rng.md.

use rand_mt::Mt;

/// PyTorch's CPU generator: mt19937 plus the cached second value of the scalar Box-Muller path.
#[derive(Clone)]
pub struct TorchRng {
    mt: Mt,
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TorchRng")
    }
}

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`: the engine takes the low 32 bits of the seed.
    pub fn new(seed: u64) -> Self {
        Self { mt: Mt::new(seed as u32), next_double_normal: None }
    }

    /// A uniform f32 in [0, 1) from 24 bits of one 32-bit draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform f64 in [0, 1) from 53 bits of a 64-bit draw (two 32-bit draws, the first the high half).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        ((hi << 32 | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal from the scalar path (`at::normal_distribution<double>`), which caches the
    /// second Box-Muller value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n)` as f32: tensors of 16 or more elements take the vectorized path (uniforms for the
    /// whole tensor, then Box-Muller over blocks of 16 pairing j with j + 8, the tail block redrawn), smaller
    /// ones the scalar double path.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// ATen's `normal_fill_16`: in float, u1 = 1 - x[j], u2 = x[j + 8].
fn box_muller_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::TorchRng;

    #[test]
    fn first_values_match_torch() {
        // torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))[:6], printed by torch 2.x.
        let cases: [(u64, usize, [f32; 6]); 3] = [
            (42, 17, [1.926_915_3, -0.159_597_47, -0.497_397_54, 0.439_589_26, -0.758_131_15, 1.078_317_6]),
            (0, 7, [1.540_996, -0.293_428_9, -2.178_789_4, 0.568_431_2, -1.084_522_4, -1.398_595_5]),
            (1, 16, [-1.525_596, -0.750_231_8, -0.653_981, -1.609_484_8, -0.100_167_18, -0.609_188_9]),
        ];
        for (seed, n, want) in cases {
            let got = TorchRng::new(seed).randn(n);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "seed {seed} n {n}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // std::mt19937 seeded with 5489 yields 3499211612 first; the 10000th output is 4123659995.
        let mut rng = TorchRng::new(5489);
        assert_eq!(rng.mt.next_u32(), 3_499_211_612);
        let mut rng = TorchRng::new(5489);
        let v = (0..10_000).map(|_| rng.mt.next_u32()).last();
        assert_eq!(v, Some(4_123_659_995));
    }
}
