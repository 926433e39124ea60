//! Kernel self-checks: each runs an op on the GPU and compares it with candle's result on the CPU, with an
//! explicit tolerance, over several shapes (awkward sizes and batch > 1 included). The native tests, the
//! browser tests (wasm-bindgen-test) and the diagnostics page all run these same bodies.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, Device, Tensor as CTensor};
use serde::Serialize;

use crate::error::Result;
use crate::gpu::{DType, GpuContext, Tensor};
use crate::ops::{self, Activation, Conv2dOpts, MatmulOpts, Tile};

/// The outcome of one kernel on one shape.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub check: &'static str,
    pub case: String,
    pub passed: bool,
    /// Largest |gpu - cpu|.
    pub max_abs_err: f32,
    /// Where the error exceeded the tolerance most (or the largest error when passing).
    pub worst: String,
    pub tolerance: String,
    /// Why the case did not run (a feature the adapter lacks); such a case counts as passed.
    pub skipped: Option<String>,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(why) = &self.skipped {
            return write!(f, "skip {} {}: {why}", self.check, self.case);
        }
        write!(
            f,
            "{} {} {}: max abs err {:.3e} ({}); {}",
            if self.passed { "pass" } else { "FAIL" },
            self.check,
            self.case,
            self.max_abs_err,
            self.tolerance,
            self.worst
        )
    }
}

/// Names of all checks, in the order the diagnostics page shows them.
pub const CHECKS: &[&str] = &[
    "elementwise",
    "activations",
    "matmul",
    "matmul_weights",
    "conv2d",
    "fusions",
    "group_norm",
    "layer_norm",
    "softmax",
    "attention",
    "layout",
    "timestep_embedding",
    "finite",
    "pack",
    "errors",
];

/// Checks that also run their cases with f16 activations where the adapter has shader-f16.
const F16_CHECKS: &[&str] = &[
    "elementwise",
    "activations",
    "matmul",
    "conv2d",
    "fusions",
    "group_norm",
    "layer_norm",
    "softmax",
    "attention",
    "layout",
];

/// Runs the check called `name`.
pub async fn run(ctx: &GpuContext, name: &str) -> Result<Vec<CheckReport>> {
    let mut r = Vec::new();
    match name {
        "elementwise" => elementwise(ctx, &mut r).await?,
        "activations" => activations(ctx, &mut r).await?,
        "matmul" => matmul(ctx, &mut r).await?,
        "matmul_weights" => matmul_weights(ctx, &mut r).await?,
        "conv2d" => conv2d(ctx, &mut r).await?,
        "fusions" => fusions(ctx, &mut r).await?,
        "group_norm" => group_norm(ctx, &mut r).await?,
        "layer_norm" => layer_norm(ctx, &mut r).await?,
        "softmax" => softmax(ctx, &mut r).await?,
        "attention" => attention(ctx, &mut r).await?,
        "layout" => layout(ctx, &mut r).await?,
        "timestep_embedding" => timestep_embedding(ctx, &mut r).await?,
        "finite" => finite(ctx, &mut r).await?,
        "pack" => pack(ctx, &mut r).await?,
        "errors" => errors(ctx, &mut r)?,
        _ => return Err(crate::Error::Invalid(format!("no self-check named {name}"))),
    }
    if !ctx.has_f16() && F16_CHECKS.contains(&name) {
        r.push(skipped(
            CHECKS.iter().find(|c| **c == name).expect("matched above"),
            "f16 cases".into(),
            "the adapter lacks shader-f16",
        ));
    }
    Ok(r)
}

/// A small deterministic generator (splitmix64) so every run checks the same data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)).collect()
    }
}

/// Compares `got` with `want`: passes when every |g - w| <= atol + rtol * |w|.
pub fn compare(check: &'static str, case: String, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> CheckReport {
    let tolerance = format!("atol {atol:.0e}, rtol {rtol:.0e}");
    if got.len() != want.len() {
        return CheckReport {
            check,
            case,
            passed: false,
            max_abs_err: f32::INFINITY,
            worst: format!("got {} values, expected {}", got.len(), want.len()),
            tolerance,
            skipped: None,
        };
    }
    let mut max_abs = 0f32;
    let mut worst = (f32::NEG_INFINITY, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = if err.is_nan() { f32::INFINITY } else { err / (atol + rtol * w.abs()) };
        max_abs = max_abs.max(if err.is_nan() { f32::INFINITY } else { err });
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    CheckReport {
        check,
        case,
        passed: worst.0 <= 1.0,
        max_abs_err: max_abs,
        worst: format!("worst at index {i}: gpu {} vs cpu {}", got.get(i).unwrap_or(&0.0), want.get(i).unwrap_or(&0.0)),
        tolerance,
        skipped: None,
    }
}

fn skipped(check: &'static str, case: String, why: &str) -> CheckReport {
    CheckReport {
        check,
        case,
        passed: true,
        max_abs_err: 0.0,
        worst: String::new(),
        tolerance: String::new(),
        skipped: Some(why.to_string()),
    }
}

/// The activation dtypes this adapter can run: f32 always, f16 with shader-f16.
fn act_dtypes(ctx: &GpuContext) -> Vec<DType> {
    if ctx.has_f16() { vec![DType::F32, DType::F16] } else { vec![DType::F32] }
}

/// Tolerances (atol, rtol) for results stored in `dtype`, scaled by the typical magnitude of the values.
fn tol(dtype: DType, scale: f32) -> (f32, f32) {
    match dtype {
        DType::F16 => (2e-3 * scale, 4e-3),
        _ => (2e-5 * scale, 2e-5),
    }
}

/// Data as stored in `dtype` (f16 rounding applied), so the CPU reference sees what the GPU sees.
fn rounded(data: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => data.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect(),
        _ => data,
    }
}

fn cpu(data: &[f32], shape: &[usize]) -> Result<CTensor> {
    Ok(CTensor::from_slice(data, shape, &Device::Cpu)?)
}

fn flat(t: &CTensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

async fn elementwise(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(1);
    let cases: [(&[usize], &[usize]); 4] =
        [(&[1000], &[1000]), (&[2, 3, 5, 7], &[7]), (&[2, 1, 5, 1], &[3, 1, 9]), (&[4, 77, 33], &[4, 1, 33])];
    for dtype in act_dtypes(ctx) {
        for (sa, sb) in cases {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let da = rounded(rng.uniform(na, -2.0, 2.0), dtype);
            let db = rounded(rng.uniform(nb, -2.0, 2.0), dtype);
            let (ga, gb) = (Tensor::from_f32_as(ctx, sa, &da, dtype)?, Tensor::from_f32_as(ctx, sb, &db, dtype)?);
            let (ca, cb) = (cpu(&da, sa)?, cpu(&db, sb)?);
            let (atol, rtol) = tol(dtype, 4.0);
            for (name, got, want) in [
                ("add", ops::add(ctx, &ga, &gb)?, ca.broadcast_add(&cb)?),
                ("mul", ops::mul(ctx, &ga, &gb)?, ca.broadcast_mul(&cb)?),
                ("sub", ops::sub(ctx, &ga, &gb)?, ca.broadcast_sub(&cb)?),
            ] {
                let case = format!("{name} {sa:?} {sb:?} {dtype}");
                r.push(compare("elementwise", case, &got.to_vec_f32(ctx).await?, &flat(&want)?, atol, rtol));
            }
        }
    }
    Ok(())
}

async fn activations(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(2);
    for dtype in act_dtypes(ctx) {
        for shape in [&[3usize, 257][..], &[2, 77, 64]] {
            let n: usize = shape.iter().product();
            let data = rounded(rng.uniform(n, -6.0, 6.0), dtype);
            let g = Tensor::from_f32_as(ctx, shape, &data, dtype)?;
            let c = cpu(&data, shape)?;
            let (atol, rtol) = tol(dtype, 6.0);
            let half = shape[shape.len() - 1] / 2;
            let cases = [
                ("silu", ops::silu(ctx, &g)?, candle_nn::ops::silu(&c)?),
                ("gelu", ops::gelu(ctx, &g)?, c.gelu_erf()?),
                ("quick_gelu", ops::quick_gelu(ctx, &g)?, (&c * candle_nn::ops::sigmoid(&(&c * 1.702)?)?)?),
                ("affine", ops::affine(ctx, &g, 0.5, -1.25)?, c.affine(0.5, -1.25)?),
                ("relu", ops::relu(ctx, &g)?, c.relu()?),
                ("soft_clamp", ops::soft_clamp(ctx, &g, 3.0)?, ((&c / 3.0)?.tanh()? * 3.0)?),
            ];
            for (name, got, want) in cases {
                let case = format!("{name} {shape:?} {dtype}");
                r.push(compare("activations", case, &got.to_vec_f32(ctx).await?, &flat(&want)?, atol, rtol));
            }
            if shape[shape.len() - 1] % 2 == 0 {
                let got = ops::geglu(ctx, &g)?;
                let h = c.narrow(D::Minus1, 0, half)?;
                let gate = c.narrow(D::Minus1, half, half)?;
                let want = (h * gate.gelu_erf()?)?;
                let case = format!("geglu {shape:?} {dtype}");
                r.push(compare("activations", case, &got.to_vec_f32(ctx).await?, &flat(&want)?, atol * 4.0, rtol));
            }
        }
    }
    Ok(())
}

/// `tile`, and the cooperative matrix tiles too for f16 on a device that has them.
fn tiles(ctx: &GpuContext, dtype: DType, tile: Tile) -> Vec<Tile> {
    let mut t = vec![tile];
    if dtype == DType::F16 && ctx.coop().is_some() {
        t.extend([Tile::Coop, Tile::CoopLarge]);
    }
    t
}

/// A case's split-K chunks in its name (nothing for k whole).
fn split_label(splits: usize) -> String {
    if splits > 1 { format!(" split-K {splits}") } else { String::new() }
}

/// Tolerances for a k-long dot product of values in [-1, 1) stored in `dtype`.
fn dot_tol(dtype: DType, k: usize) -> (f32, f32) {
    let scale = (k as f32).sqrt();
    match dtype {
        DType::F16 => (4e-3 * scale, 4e-3),
        _ => (1e-5 * scale, 1e-4),
    }
}

async fn matmul(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(3);
    // (batch dims of A, of B, m, k, n, trans_a, trans_b, bias, act, tile, split-K chunks)
    type Case =
        (&'static [usize], &'static [usize], usize, usize, usize, bool, bool, bool, Option<Activation>, Tile, usize);
    let cases: [Case; 8] = [
        (&[], &[], 1, 1, 1, false, false, false, None, Tile::Small, 1),
        (&[], &[], 77, 50, 33, false, true, true, None, Tile::Small, 1),
        (&[3], &[3], 65, 17, 70, false, false, false, None, Tile::Small, 1),
        (&[2], &[], 130, 96, 129, false, true, true, Some(Activation::Gelu), Tile::Large, 3),
        (&[2, 2], &[2, 2], 31, 40, 45, true, false, false, None, Tile::Small, 1),
        (&[], &[2], 64, 64, 64, true, true, false, None, Tile::Large, 1),
        (&[], &[], 200, 130, 257, false, true, true, Some(Activation::Silu), Tile::Large, 1),
        (&[2], &[], 129, 320, 20, false, true, true, Some(Activation::QuickGelu), Tile::Small, 4),
    ];
    for dtype in act_dtypes(ctx) {
        for (bda, bdb, m, k, n, ta, tb, has_bias, act, tile, split) in cases.into_iter().flat_map(|c| {
            tiles(ctx, dtype, c.9).into_iter().map(move |t| (c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, t, c.10))
        }) {
            let shape_a: Vec<usize> = bda.iter().copied().chain(if ta { [k, m] } else { [m, k] }).collect();
            let shape_b: Vec<usize> = bdb.iter().copied().chain(if tb { [n, k] } else { [k, n] }).collect();
            let da = rounded(rng.uniform(shape_a.iter().product(), -1.0, 1.0), dtype);
            let db = rounded(rng.uniform(shape_b.iter().product(), -1.0, 1.0), dtype);
            let dbias = rounded(rng.uniform(n, -1.0, 1.0), dtype);
            let ga = Tensor::from_f32_as(ctx, &shape_a, &da, dtype)?;
            let gb = Tensor::from_f32_as(ctx, &shape_b, &db, dtype)?;
            let gbias = Tensor::from_f32_as(ctx, &[n], &dbias, dtype)?;
            let opts = MatmulOpts {
                trans_a: ta,
                trans_b: tb,
                bias: has_bias.then_some(&gbias),
                act,
                tile: Some(tile),
                split_k: (split > 1).then_some(split),
                ..Default::default()
            };
            let got = ops::matmul(ctx, &ga, &gb, opts)?.to_vec_f32(ctx).await?;
            let mut ca = cpu(&da, &shape_a)?;
            let mut cb = cpu(&db, &shape_b)?;
            if ta {
                ca = ca.t()?;
            }
            if tb {
                cb = cb.t()?;
            }
            let mut want = ca.broadcast_matmul(&cb)?;
            if has_bias {
                want = want.broadcast_add(&cpu(&dbias, &[n])?)?;
            }
            want = crate::ops::cpu::act(&want, act)?;
            let case = format!(
                "A {shape_a:?}{} B {shape_b:?}{}{}{} {tile:?}{} {dtype}",
                if ta { "^T" } else { "" },
                if tb { "^T" } else { "" },
                if has_bias { " +bias" } else { "" },
                act.map(|a| format!(" {a:?}")).unwrap_or_default(),
                split_label(split)
            );
            let (atol, rtol) = dot_tol(dtype, k);
            r.push(compare("matmul", case, &got, &flat(&want)?, atol, rtol));
        }
    }
    Ok(())
}

/// Linear layers with f16, q8_0 and q4_0 weights against candle's dequantized weights.
async fn matmul_weights(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(4);
    // k = 27: f16 weights whose rows start mid-word (read element by element) and end off a multiple of 4
    // (q8_0 and q4_0 need whole blocks of 32).
    for (rows, k, n) in [(5usize, 64usize, 40usize), (77, 96, 130), (130, 320, 129), (9, 27, 10)] {
        let dx = rng.uniform(rows * k, -1.0, 1.0);
        let dw = rng.uniform(n * k, -1.0, 1.0);
        let dbias = rng.uniform(n, -1.0, 1.0);
        let x = Tensor::from_f32(ctx, &[rows, k], &dx)?;
        let bias = Tensor::from_f32(ctx, &[n], &dbias)?;
        let whole_blocks = k.is_multiple_of(32);
        for wdtype in [DType::F16, DType::Q8_0, DType::Q4_0].into_iter().filter(|d| whole_blocks || !d.is_quantized()) {
            let w = Tensor::from_f32_as(ctx, &[n, k], &dw, wdtype)?;
            // The reference multiplies by the weights as stored, read back through the GPU layout.
            let stored = w.to_vec_f32(ctx).await?;
            let got = ops::linear(ctx, &x, &w, Some(&bias))?.to_vec_f32(ctx).await?;
            let want =
                cpu(&dx, &[rows, k])?.matmul(&cpu(&stored, &[n, k])?.t()?)?.broadcast_add(&cpu(&dbias, &[n])?)?;
            let case = format!("x [{rows}, {k}] f32, weight [{n}, {k}] {wdtype}");
            let (atol, rtol) = dot_tol(DType::F32, k);
            r.push(compare("matmul_weights", case, &got, &flat(&want)?, atol, rtol));
            // f16 activations (how real-size models run), on each tile they can take.
            if ctx.has_f16() {
                let dx16 = rounded(dx.clone(), DType::F16);
                let x16 = Tensor::from_f32_as(ctx, &[rows, k], &dx16, DType::F16)?;
                let bias16 = Tensor::from_f32_as(ctx, &[n], &dbias, DType::F16)?;
                let dbias16 = rounded(dbias.clone(), DType::F16);
                let want = cpu(&dx16, &[rows, k])?
                    .matmul(&cpu(&stored, &[n, k])?.t()?)?
                    .broadcast_add(&cpu(&dbias16, &[n])?)?;
                for tile in tiles(ctx, DType::F16, Tile::Small) {
                    let opts = MatmulOpts { bias: Some(&bias16), tile: Some(tile), ..Default::default() };
                    let got = ops::linear_with(ctx, &x16, &w, opts)?.to_vec_f32(ctx).await?;
                    let case = format!("x [{rows}, {k}] f16, weight [{n}, {k}] {wdtype} {tile:?}");
                    let (atol, rtol) = dot_tol(DType::F16, k);
                    r.push(compare("matmul_weights", case, &got, &flat(&want)?, atol, rtol));
                }
            }
        }
        // The stored blocks are candle's own quantization, and dequantize as candle does.
        if whole_blocks {
            for (wdtype, gdtype) in [(DType::Q8_0, GgmlDType::Q8_0), (DType::Q4_0, GgmlDType::Q4_0)] {
                let q = QTensor::quantize(&cpu(&dw, &[n, k])?, gdtype)?;
                let w = Tensor::from_f32_as(ctx, &[n, k], &dw, wdtype)?;
                let case = format!("{wdtype} [{n}, {k}] dequantized vs candle");
                let want = flat(&q.dequantize(&Device::Cpu)?)?;
                r.push(compare("matmul_weights", case, &w.to_vec_f32(ctx).await?, &want, 0.0, 0.0));
            }
        }
    }
    Ok(())
}

async fn conv2d(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(5);
    // (batch, cin, h, w, cout, k, stride, pad, pad_end, tile, split-K chunks)
    let cases = [
        (1usize, 3usize, 8usize, 8usize, 5usize, 3usize, 1usize, 1usize, 1usize, Tile::Small, 1usize),
        (2, 4, 9, 7, 6, 3, 2, 1, 1, Tile::Small, 3),
        (2, 5, 13, 11, 7, 1, 1, 0, 0, Tile::Small, 1),
        (1, 8, 17, 16, 130, 3, 1, 1, 1, Tile::Large, 2),
        (2, 6, 12, 12, 9, 3, 2, 0, 0, Tile::Large, 1),
        (1, 4, 10, 9, 6, 3, 2, 0, 1, Tile::Small, 1),
    ];
    for dtype in act_dtypes(ctx) {
        for (b, cin, h, w, cout, k, stride, pad, pad_end, tile, split) in cases.into_iter().flat_map(|c| {
            tiles(ctx, dtype, c.9).into_iter().map(move |t| (c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, t, c.10))
        }) {
            let dx = rounded(rng.uniform(b * cin * h * w, -1.0, 1.0), dtype);
            let dw = rounded(rng.uniform(cout * cin * k * k, -1.0, 1.0), dtype);
            let dbias = rounded(rng.uniform(cout, -1.0, 1.0), dtype);
            let gx = Tensor::from_f32_as(ctx, &[b, cin, h, w], &dx, dtype)?;
            let gw = Tensor::from_f32_as(ctx, &[cout, cin, k, k], &dw, dtype)?;
            let gbias = Tensor::from_f32_as(ctx, &[cout], &dbias, dtype)?;
            let act = (pad_end != pad).then_some(Activation::Relu);
            let opts = Conv2dOpts {
                stride,
                padding: pad,
                padding_end: Some(pad_end),
                act,
                tile: Some(tile),
                split_k: (split > 1).then_some(split),
                ..Default::default()
            };
            let got = ops::conv2d(ctx, &gx, &gw, (k, k), Some(&gbias), opts)?.to_vec_f32(ctx).await?;
            // candle pads symmetrically: pad the input explicitly.
            let x = cpu(&dx, &[b, cin, h, w])?.pad_with_zeros(2, pad, pad_end)?.pad_with_zeros(3, pad, pad_end)?;
            let want = x.conv2d(&cpu(&dw, &[cout, cin, k, k])?, 0, stride, 1, 1)?;
            let want = crate::ops::cpu::act(&want.broadcast_add(&cpu(&dbias, &[1, cout, 1, 1])?)?, act)?;
            let case = format!(
                "x [{b}, {cin}, {h}, {w}] w [{cout}, {cin}, {k}, {k}] stride {stride} pad ({pad}, {pad_end}){} {tile:?}{} {dtype}",
                act.map(|a| format!(" {a:?}")).unwrap_or_default(),
                split_label(split)
            );
            let (atol, rtol) = dot_tol(dtype, cin * k * k);
            r.push(compare("conv2d", case, &got, &flat(&want)?, atol, rtol));
        }
    }
    Ok(())
}

/// Random data of `shape` on the GPU (as `dtype`) and the same values on the CPU fallback.
fn pair(ctx: &GpuContext, rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
    let data = rounded(rng.uniform(shape.iter().product(), -1.0, 1.0), dtype);
    Ok((Tensor::from_f32_as(ctx, shape, &data, dtype)?, Tensor::from_f32(&GpuContext::cpu(), shape, &data)?))
}

/// A weight on the GPU as `wdtype`, and on the CPU as stored (quantized blocks dequantized).
async fn weight_pair(ctx: &GpuContext, rng: &mut Rng, shape: &[usize], wdtype: DType) -> Result<(Tensor, Tensor)> {
    let g = Tensor::from_f32_as(ctx, shape, &rng.uniform(shape.iter().product(), -1.0, 1.0), wdtype)?;
    let stored = g.to_vec_f32(ctx).await?;
    Ok((g, Tensor::from_f32(&GpuContext::cpu(), shape, &stored)?))
}

/// The GEMM core's fused epilogues and prologues (residual, layer norm, GEGLU, transposed output, bias rows,
/// conv over a concatenation or a 2x upsampling) against the same ops on the CPU fallback, which runs them
/// unfused on candle.
async fn fusions(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let cpu_ctx = GpuContext::cpu();
    let mut rng = Rng::new(11);
    for dtype in act_dtypes(ctx) {
        let wdtypes: &[DType] = if dtype == DType::F32 { &[DType::F32, DType::Q8_0] } else { &[DType::F16] };
        for &wdtype in wdtypes {
            // (m, k, n, layer norm, geglu, residual, tile, split-K chunks)
            let cases = [
                (77, 40, 33, true, false, false, Tile::Small, 1),
                (130, 96, 129, true, false, false, Tile::Large, 3),
                (70, 64, 48, false, false, true, Tile::Small, 2),
                (100, 64, 256, true, true, false, Tile::Large, 1),
                (33, 64, 192, false, true, false, Tile::Small, 1),
            ];
            for (m, k, n, ln, geglu, res, tile, split) in cases
                .into_iter()
                .flat_map(|c| tiles(ctx, dtype, c.6).into_iter().map(move |t| (c.0, c.1, c.2, c.3, c.4, c.5, t, c.7)))
            {
                if wdtype.is_quantized() && k % 32 != 0 {
                    continue;
                }
                let (gx, cx) = pair(ctx, &mut rng, &[2, m, k], dtype)?;
                let (gw, cw) = weight_pair(ctx, &mut rng, &[n, k], wdtype).await?;
                let (gb, cb) = pair(ctx, &mut rng, &[n], dtype)?;
                let (gg, cg) = pair(ctx, &mut rng, &[k], dtype)?;
                let (gbeta, cbeta) = pair(ctx, &mut rng, &[k], dtype)?;
                let cols = if geglu { n / 2 } else { n };
                let (gr, cr) = pair(ctx, &mut rng, &[2, m, cols], dtype)?;
                let gln = ops::LnParams::new(ctx, gg, gbeta, 1e-5)?;
                let cln = ops::LnParams::new(&cpu_ctx, cg, cbeta, 1e-5)?;
                let opts = |b, ln, res| MatmulOpts {
                    bias: Some(b),
                    layer_norm: ln,
                    geglu,
                    residual: res,
                    tile: Some(tile),
                    split_k: (split > 1).then_some(split),
                    ..Default::default()
                };
                let got = ops::linear_with(ctx, &gx, &gw, opts(&gb, ln.then_some(&gln), res.then_some(&gr)))?;
                let want = ops::linear_with(&cpu_ctx, &cx, &cw, opts(&cb, ln.then_some(&cln), res.then_some(&cr)))?;
                let case = format!(
                    "x [2, {m}, {k}] w [{n}, {k}] {wdtype}{}{}{} {tile:?}{} {dtype}",
                    if ln { " +layer norm" } else { "" },
                    if geglu { " +geglu" } else { "" },
                    if res { " +residual" } else { "" },
                    split_label(split)
                );
                let (atol, rtol) = dot_tol(dtype, k);
                let want = want.cpu()?.flatten_all()?.to_vec1::<f32>()?;
                r.push(compare("fusions", case, &got.to_vec_f32(ctx).await?, &want, atol, rtol));
            }
        }
        // Tokens back to channels-first with a residual, and bias rows per batch item inside a larger tensor.
        let (gx, cx) = pair(ctx, &mut rng, &[2, 45, 40], dtype)?;
        let (gw, cw) = pair(ctx, &mut rng, &[33, 40], dtype)?;
        let (gbias, cbias) = pair(ctx, &mut rng, &[100], dtype)?;
        let (gr, cr) = pair(ctx, &mut rng, &[2, 33, 45], dtype)?;
        let opts = |b, res, split| MatmulOpts {
            bias: Some(b),
            bias_at: (10, 50),
            residual: Some(res),
            trans_c: true,
            split_k: (split > 1).then_some(split),
            ..Default::default()
        };
        for split in [1, 3] {
            let got = ops::linear_with(ctx, &gx, &gw, opts(&gbias, &gr, split))?.to_vec_f32(ctx).await?;
            let want = ops::linear_with(&cpu_ctx, &cx, &cw, opts(&cbias, &cr, split))?;
            let case =
                format!("x [2, 45, 40] w [33, 40] -> (2, 33, 45) +bias rows +residual{} {dtype}", split_label(split));
            let (atol, rtol) = dot_tol(dtype, 40);
            r.push(compare("fusions", case, &got, &flat(want.cpu()?)?, atol, rtol));
        }
        // Convolutions over a group-normalized input (+ SiLU), the norm applied as the input is loaded.
        let gn_convs = [
            (&[2usize, 8, 9, 7][..], 0usize, true, false, Tile::Small, 2),
            (&[2, 6, 6, 5], 2, false, true, Tile::Large, 1),
        ];
        for (shape, more, silu, up, tile, split) in gn_convs
            .into_iter()
            .flat_map(|c| tiles(ctx, dtype, c.4).into_iter().map(move |t| (c.0, c.1, c.2, c.3, t, c.5)))
        {
            let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            let (cin, groups, cout) = (c + more, 4, 9);
            let data = rng.uniform(b * c * h * w, -3.0, 5.0);
            let data = rounded(data, dtype);
            let gx = Tensor::from_f32_as(ctx, shape, &data, dtype)?;
            let cx = Tensor::from_f32(&cpu_ctx, shape, &data)?;
            let (gm, cm) = pair(ctx, &mut rng, &[b, more.max(1), h, w], dtype)?;
            let (gw, cw) = pair(ctx, &mut rng, &[cout, cin, 3, 3], dtype)?;
            let (gbias, cbias) = pair(ctx, &mut rng, &[cout], dtype)?;
            let (gg, cg) = pair(ctx, &mut rng, &[cin], dtype)?;
            let (gbeta, cbeta) = pair(ctx, &mut rng, &[cin], dtype)?;
            let gp = ops::GnParams::new(ctx, gg, gbeta, groups, 1e-5)?;
            let cp = ops::GnParams::new(&cpu_ctx, cg, cbeta, groups, 1e-5)?;
            let m = |t| (more > 0).then_some(t);
            let gstats = ops::group_norm_stats(ctx, &gx, m(&gm), &gp)?;
            let cstats = ops::group_norm_stats(&cpu_ctx, &cx, m(&cm), &cp)?;
            let opts = |more, params, stats| Conv2dOpts {
                padding: 1,
                concat: more,
                upsample: up,
                norm: Some(ops::GnInput { params, stats, silu }),
                tile: Some(tile),
                split_k: (split > 1).then_some(split),
                ..Default::default()
            };
            let got = ops::conv2d(ctx, &gx, &gw, (3, 3), Some(&gbias), opts(m(&gm), &gp, &gstats))?;
            let want = ops::conv2d(&cpu_ctx, &cx, &cw, (3, 3), Some(&cbias), opts(m(&cm), &cp, &cstats))?;
            let case = format!(
                "conv x {shape:?}{} group-normalized in {groups} groups{}{} {tile:?}{} {dtype}",
                if more > 0 { format!(" ++ {more} channels") } else { String::new() },
                if silu { " +silu" } else { "" },
                if up { " upsampled" } else { "" },
                split_label(split)
            );
            let (atol, rtol) = dot_tol(dtype, cin * 9);
            r.push(compare("fusions", case, &got.to_vec_f32(ctx).await?, &flat(want.cpu()?)?, atol * 2.0, rtol * 2.0));
            // The statistics themselves.
            let got = gstats.to_vec_f32(ctx).await?;
            let (atol, rtol) = tol(dtype, 4.0);
            let case = format!("group norm statistics of {shape:?}{} {dtype}", if more > 0 { " ++ more" } else { "" });
            r.push(compare("fusions", case, &got, &flat(cstats.cpu()?)?, atol * 2.0, rtol * 2.0));
        }
        // Convolutions: (x, concatenated, upsample, k, residual, bias rows, tile, split-K chunks).
        type ConvCase = (&'static [usize], usize, bool, usize, bool, bool, Tile, usize);
        let convs: [ConvCase; 5] = [
            (&[2, 8, 9, 7], 0, false, 3, true, false, Tile::Small, 2),
            (&[2, 5, 6, 6], 3, false, 1, false, true, Tile::Small, 1),
            (&[2, 5, 6, 6], 3, false, 3, false, false, Tile::Large, 1),
            (&[1, 4, 5, 6], 0, true, 3, false, false, Tile::Small, 1),
            (&[2, 6, 4, 4], 2, true, 3, false, true, Tile::Large, 3),
        ];
        for (shape, more, up, k, res, rows, tile, split) in convs
            .into_iter()
            .flat_map(|c| tiles(ctx, dtype, c.6).into_iter().map(move |t| (c.0, c.1, c.2, c.3, c.4, c.5, t, c.7)))
        {
            let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            let cout = 9;
            let (gx, cx) = pair(ctx, &mut rng, shape, dtype)?;
            let (gm, cm) = pair(ctx, &mut rng, &[b, more.max(1), h, w], dtype)?;
            let (gw, cw) = pair(ctx, &mut rng, &[cout, c + more, k, k], dtype)?;
            let (gbias, cbias) = pair(ctx, &mut rng, &[40], dtype)?;
            let (ho, wo) = if up { (2 * h, 2 * w) } else { (h, w) };
            let (gr, cr) = pair(ctx, &mut rng, &[b, cout, ho, wo], dtype)?;
            let opts = |m, res| Conv2dOpts {
                padding: k / 2,
                bias_at: if rows { (4, 20) } else { (0, 0) },
                residual: res,
                concat: m,
                upsample: up,
                tile: Some(tile),
                split_k: (split > 1).then_some(split),
                ..Default::default()
            };
            let (gbias, cbias) = if rows { (gbias, cbias) } else { pair(ctx, &mut rng, &[cout], dtype)? };
            let got =
                ops::conv2d(ctx, &gx, &gw, (k, k), Some(&gbias), opts((more > 0).then_some(&gm), res.then_some(&gr)))?;
            let want = ops::conv2d(
                &cpu_ctx,
                &cx,
                &cw,
                (k, k),
                Some(&cbias),
                opts((more > 0).then_some(&cm), res.then_some(&cr)),
            )?;
            let case = format!(
                "conv x {shape:?}{}{} k{k}{}{} {tile:?}{} {dtype}",
                if more > 0 { format!(" ++ {more} channels") } else { String::new() },
                if up { " upsampled" } else { "" },
                if res { " +residual" } else { "" },
                if rows { " +bias rows" } else { "" },
                split_label(split)
            );
            let (atol, rtol) = dot_tol(dtype, (c + more) * k * k);
            r.push(compare("fusions", case, &got.to_vec_f32(ctx).await?, &flat(want.cpu()?)?, atol, rtol));
        }
    }
    Ok(())
}

async fn group_norm(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(6);
    // (shape, groups, silu)
    let cases: [(&[usize], usize, bool); 4] = [
        (&[1, 32, 8, 8], 32, false),
        (&[2, 64, 5, 7], 32, true),
        (&[2, 6, 300], 3, false),
        (&[1, 12, 33, 17], 4, true),
    ];
    for dtype in act_dtypes(ctx) {
        for (shape, groups, silu) in cases {
            let n: usize = shape.iter().product();
            let c = shape[1];
            let dx = rounded(rng.uniform(n, -3.0, 5.0), dtype);
            let dg = rounded(rng.uniform(c, 0.5, 1.5), dtype);
            let db = rounded(rng.uniform(c, -0.5, 0.5), dtype);
            let (gx, gg, gb) = (
                Tensor::from_f32_as(ctx, shape, &dx, dtype)?,
                Tensor::from_f32_as(ctx, &[c], &dg, dtype)?,
                Tensor::from_f32_as(ctx, &[c], &db, dtype)?,
            );
            let got = ops::group_norm(ctx, &gx, groups, &gg, &gb, 1e-5, silu)?.to_vec_f32(ctx).await?;
            let x = cpu(&dx, &[shape[0], groups, n / shape[0] / groups])?;
            let mean = x.mean_keepdim(D::Minus1)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?.reshape(shape)?;
            let mut affine_shape = vec![1, c];
            affine_shape.resize(shape.len(), 1);
            let mut want = normed.broadcast_mul(&cpu(&dg, &affine_shape)?)?.broadcast_add(&cpu(&db, &affine_shape)?)?;
            if silu {
                want = candle_nn::ops::silu(&want)?;
            }
            let case = format!("{shape:?} groups {groups}{} {dtype}", if silu { " +silu" } else { "" });
            let (atol, rtol) = tol(dtype, 4.0);
            r.push(compare("group_norm", case, &got, &flat(&want)?, atol * 2.0, rtol * 2.0));
            // The same input given as two parts split mid-group, as the UNet's up path concatenates.
            if shape.len() == 4 {
                let split = c / 2 + 1;
                let whole = cpu(&dx, shape)?;
                let part = |from: usize, len: usize| -> Result<Tensor> {
                    let p = whole.narrow(1, from, len)?;
                    Tensor::from_f32_as(ctx, p.dims(), &flat(&p)?, dtype)
                };
                let (a, b) = (part(0, split)?, part(split, c - split)?);
                let got = ops::group_norm_cat(ctx, &a, Some(&b), groups, &gg, &gb, 1e-5, silu)?.to_vec_f32(ctx).await?;
                let case = format!("{shape:?} as {split} + {} channels groups {groups} {dtype}", c - split);
                r.push(compare("group_norm", case, &got, &flat(&want)?, atol * 2.0, rtol * 2.0));
            }
        }
    }
    Ok(())
}

async fn layer_norm(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(7);
    let cases: [(&[usize], bool); 4] = [(&[77, 64], true), (&[2, 77, 320], true), (&[3, 1000], false), (&[5, 7], true)];
    for dtype in act_dtypes(ctx) {
        for (shape, affine) in cases {
            let n: usize = shape.iter().product();
            let c = shape[shape.len() - 1];
            let dx = rounded(rng.uniform(n, -3.0, 5.0), dtype);
            let dg = rounded(rng.uniform(c, 0.5, 1.5), dtype);
            let db = rounded(rng.uniform(c, -0.5, 0.5), dtype);
            let gx = Tensor::from_f32_as(ctx, shape, &dx, dtype)?;
            let gg = Tensor::from_f32_as(ctx, &[c], &dg, dtype)?;
            let gb = Tensor::from_f32_as(ctx, &[c], &db, dtype)?;
            let got = ops::layer_norm(ctx, &gx, affine.then_some((&gg, &gb)), 1e-5)?.to_vec_f32(ctx).await?;
            let (cg, cb) = if affine {
                (cpu(&dg, &[c])?, cpu(&db, &[c])?)
            } else {
                (
                    CTensor::ones(c, candle_core::DType::F32, &Device::Cpu)?,
                    CTensor::zeros(c, candle_core::DType::F32, &Device::Cpu)?,
                )
            };
            let want = candle_nn::ops::layer_norm(&cpu(&dx, shape)?, &cg, &cb, 1e-5)?;
            let case = format!("{shape:?}{} {dtype}", if affine { " affine" } else { "" });
            let (atol, rtol) = tol(dtype, 4.0);
            r.push(compare("layer_norm", case, &got, &flat(&want)?, atol * 2.0, rtol * 2.0));
        }
    }
    Ok(())
}

async fn softmax(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(8);
    for dtype in act_dtypes(ctx) {
        for shape in [&[1usize, 1][..], &[3, 77], &[2, 8, 1000], &[5, 4096]] {
            let n: usize = shape.iter().product();
            let dx = rounded(rng.uniform(n, -20.0, 20.0), dtype);
            let got = ops::softmax(ctx, &Tensor::from_f32_as(ctx, shape, &dx, dtype)?)?.to_vec_f32(ctx).await?;
            let want = candle_nn::ops::softmax_last_dim(&cpu(&dx, shape)?)?;
            let (atol, rtol) = tol(dtype, 0.05);
            r.push(compare("softmax", format!("{shape:?} {dtype}"), &got, &flat(&want)?, atol, rtol * 2.0));
        }
    }
    Ok(())
}

async fn attention(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(9);
    // (batch, lq, lk, heads, head dim, causal)
    let cases = [
        (1usize, 1usize, 1usize, 1usize, 4usize, false),
        (2, 77, 77, 2, 64, true),
        (2, 100, 77, 8, 40, false),
        (1, 130, 130, 2, 80, false),
        (2, 70, 33, 1, 160, false),
        (1, 65, 65, 3, 5, true),
        (2, 50, 50, 1, 300, false),
    ];
    for dtype in act_dtypes(ctx) {
        for (b, lq, lk, heads, d, causal) in cases {
            let hd = heads * d;
            let dq = rounded(rng.uniform(b * lq * hd, -1.0, 1.0), dtype);
            let dk = rounded(rng.uniform(b * lk * hd, -1.0, 1.0), dtype);
            let dv = rounded(rng.uniform(b * lk * hd, -1.0, 1.0), dtype);
            let scale = 1.0 / (d as f32).sqrt();
            let q = Tensor::from_f32_as(ctx, &[b, lq, hd], &dq, dtype)?;
            let k = Tensor::from_f32_as(ctx, &[b, lk, hd], &dk, dtype)?;
            let v = Tensor::from_f32_as(ctx, &[b, lk, hd], &dv, dtype)?;
            let got = ops::attention(ctx, &q, &k, &v, heads, scale, causal)?.to_vec_f32(ctx).await?;
            let want = crate::ops::cpu::attention(
                &cpu(&dq, &[b, lq, hd])?,
                &cpu(&dk, &[b, lk, hd])?,
                &cpu(&dv, &[b, lk, hd])?,
                heads,
                scale as f64,
                causal,
            )?;
            let case =
                format!("b {b} lq {lq} lk {lk} heads {heads} d {d}{} {dtype}", if causal { " causal" } else { "" });
            let (atol, rtol) = tol(dtype, 1.0);
            r.push(compare("attention", case, &got, &flat(&want)?, atol * 5.0, rtol * 5.0));
        }
        // q, k and v read in place from one (b, l, 3 hd) projection, and k, v from one (b, lk, 2 hd).
        for (b, lq, lk, heads, d) in [(2usize, 70usize, 70usize, 2usize, 40usize), (2, 33, 77, 4, 8)] {
            let hd = heads * d;
            let self_attention = lq == lk;
            let dqkv = rounded(rng.uniform(b * lq * 3 * hd, -1.0, 1.0), dtype);
            let dkv = rounded(rng.uniform(b * lk * 2 * hd, -1.0, 1.0), dtype);
            let qkv = Tensor::from_f32_as(ctx, &[b, lq, 3 * hd], &dqkv, dtype)?;
            let kv = Tensor::from_f32_as(ctx, &[b, lk, 2 * hd], &dkv, dtype)?;
            let scale = 1.0 / (d as f32).sqrt();
            let (k, v) = if self_attention {
                (ops::Cols { t: &qkv, col: hd, width: 3 * hd }, ops::Cols { t: &qkv, col: 2 * hd, width: 3 * hd })
            } else {
                (ops::Cols { t: &kv, col: 0, width: 2 * hd }, ops::Cols { t: &kv, col: hd, width: 2 * hd })
            };
            let q = ops::Cols { t: &qkv, col: 0, width: 3 * hd };
            let got = ops::attention_cols(ctx, q, k, v, heads, hd, scale, false)?.to_vec_f32(ctx).await?;
            let cqkv = cpu(&dqkv, &[b, lq, 3 * hd])?;
            let ckv = cpu(&dkv, &[b, lk, 2 * hd])?;
            let (ck, cv) = if self_attention {
                (cqkv.narrow(2, hd, hd)?, cqkv.narrow(2, 2 * hd, hd)?)
            } else {
                (ckv.narrow(2, 0, hd)?, ckv.narrow(2, hd, hd)?)
            };
            let want = crate::ops::cpu::attention(&cqkv.narrow(2, 0, hd)?, &ck, &cv, heads, scale as f64, false)?;
            let case = format!(
                "b {b} lq {lq} lk {lk} heads {heads} d {d} from {} {dtype}",
                if self_attention { "one qkv tensor" } else { "q and one kv tensor" }
            );
            let (atol, rtol) = tol(dtype, 1.0);
            r.push(compare("attention", case, &got, &flat(&want)?, atol * 5.0, rtol * 5.0));
        }
    }
    Ok(())
}

async fn layout(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(10);
    for dtype in act_dtypes(ctx) {
        let shape = [2usize, 3, 5, 7];
        let dx = rounded(rng.uniform(210, -1.0, 1.0), dtype);
        let (gx, cx) = (Tensor::from_f32_as(ctx, &shape, &dx, dtype)?, cpu(&dx, &shape)?);
        let got = ops::upsample_nearest2x(ctx, &gx)?.to_vec_f32(ctx).await?;
        r.push(compare(
            "layout",
            format!("upsample {shape:?} {dtype}"),
            &got,
            &flat(&cx.upsample_nearest2d(10, 14)?)?,
            0.0,
            0.0,
        ));
        let dy = rounded(rng.uniform(2 * 4 * 35, -1.0, 1.0), dtype);
        let (gy, cy) = (Tensor::from_f32_as(ctx, &[2, 4, 5, 7], &dy, dtype)?, cpu(&dy, &[2, 4, 5, 7])?);
        let got = ops::concat(ctx, &gx, &gy, 1)?.to_vec_f32(ctx).await?;
        let want = CTensor::cat(&[&cx, &cy], 1)?;
        r.push(compare(
            "layout",
            format!("concat dim 1 {shape:?} {:?} {dtype}", [2, 4, 5, 7]),
            &got,
            &flat(&want)?,
            0.0,
            0.0,
        ));
        let got = ops::concat(ctx, &gx, &gx, 3)?.to_vec_f32(ctx).await?;
        r.push(compare(
            "layout",
            format!("concat dim 3 {shape:?} {dtype}"),
            &got,
            &flat(&CTensor::cat(&[&cx, &cx], 3)?)?,
            0.0,
            0.0,
        ));
        for (b, rows, cols) in [(1usize, 1usize, 1usize), (2, 33, 17), (3, 64, 320), (1, 7, 100)] {
            let d = rounded(rng.uniform(b * rows * cols, -1.0, 1.0), dtype);
            let got = ops::transpose_last2(ctx, &Tensor::from_f32_as(ctx, &[b, rows, cols], &d, dtype)?)?
                .to_vec_f32(ctx)
                .await?;
            let want = cpu(&d, &[b, rows, cols])?.transpose(1, 2)?;
            r.push(compare(
                "layout",
                format!("transpose [{b}, {rows}, {cols}] {dtype}"),
                &got,
                &flat(&want)?,
                0.0,
                0.0,
            ));
        }
        let tokens = ops::nchw_to_tokens(ctx, &gx)?;
        let back = ops::tokens_to_nchw(ctx, &tokens, 5, 7)?.to_vec_f32(ctx).await?;
        let want = cx.reshape((2, 3, 35))?.transpose(1, 2)?;
        r.push(compare(
            "layout",
            format!("nchw_to_tokens {shape:?} {dtype}"),
            &tokens.to_vec_f32(ctx).await?,
            &flat(&want)?,
            0.0,
            0.0,
        ));
        r.push(compare("layout", format!("tokens_to_nchw {dtype}"), &back, &dx, 0.0, 0.0));
    }
    // Embedding rows gathered from f32 and packed-f16 tables.
    let table = rng.uniform(50 * 7, -1.0, 1.0);
    let ids = [3.0f32, 0.0, 49.0, 7.0, 7.0, 12.0];
    let gids = Tensor::from_f32(ctx, &[2, 3], &ids)?;
    for tdtype in [DType::F32, DType::F16] {
        let stored = rounded(table.clone(), tdtype);
        let gt = Tensor::from_f32_as(ctx, &[50, 7], &table, tdtype)?;
        let got = ops::embedding(ctx, &gt, &gids, DType::F32)?.to_vec_f32(ctx).await?;
        let want: Vec<f32> = ids.iter().flat_map(|&i| stored[i as usize * 7..i as usize * 7 + 7].to_vec()).collect();
        r.push(compare("layout", format!("embedding [50, 7] {tdtype} table, ids [2, 3]"), &got, &want, 0.0, 0.0));
    }
    if ctx.has_f16() {
        let d = rng.uniform(1001, -100.0, 100.0);
        let x = Tensor::from_f32(ctx, &[1001], &d)?;
        let h = ops::cast(ctx, &x, DType::F16)?;
        let want = rounded(d.clone(), DType::F16);
        r.push(compare("layout", "cast f32 -> f16 [1001]".into(), &h.to_vec_f32(ctx).await?, &want, 0.0, 0.0));
        let back = ops::cast(ctx, &h, DType::F32)?.to_vec_f32(ctx).await?;
        r.push(compare("layout", "cast f16 -> f32 [1001]".into(), &back, &want, 0.0, 0.0));
    }
    Ok(())
}

async fn timestep_embedding(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let ts = [999.0f32, 500.5, 1.0, 0.0];
    let t = Tensor::from_f32(ctx, &[4], &ts)?;
    for (dim, flip, shift) in [(320usize, true, 0.0f32), (33, false, 1.0), (64, true, 1.0)] {
        let cfg = ops::TimestepEmbedding {
            dim,
            flip_sin_to_cos: flip,
            downscale_freq_shift: shift,
            max_period: 10000.0,
            scale: 1.0,
        };
        let got = ops::timestep_embedding(ctx, &t, cfg, DType::F32)?.to_vec_f32(ctx).await?;
        // diffusers' get_timestep_embedding, in f64.
        let half = dim / 2;
        let mut want = Vec::new();
        for &tv in &ts {
            let args: Vec<f64> = (0..half)
                .map(|i| tv as f64 * (-(10000f64).ln() * i as f64 / (half as f64 - shift as f64)).exp())
                .collect();
            let (sin, cos): (Vec<f64>, Vec<f64>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            let (first, second) = if flip { (cos, sin) } else { (sin, cos) };
            want.extend(first.iter().chain(&second).map(|&v| v as f32));
            if dim % 2 == 1 {
                want.push(0.0);
            }
        }
        // Arguments reach 999: f32 rounding of the argument alone moves sin/cos by ~1e-4.
        let case = format!("t {ts:?} dim {dim} flip {flip} shift {shift}");
        r.push(compare("timestep_embedding", case, &got, &want, 3e-4, 0.0));
    }
    Ok(())
}

/// Reports whether `result` is an error whose message contains every one of `needles`.
/// The non-finite check (the pipeline's NaN guard) against Rust's `is_finite` on the same values: clean
/// tensors, a NaN, +-infinity and f16 overflow, anywhere (first, last, the high half of an f16 word, past the
/// first pass of the grid-stride loop), f32 and f16 layouts (f16 needs no shader-f16: words are read raw).
/// Weights computed on the GPU stored as f16 pairs or q8_0/q4_0 blocks (`ops::pack`) against the host's
/// conversion (half's rounding; candle's GGML quantization), odd block counts and an odd length included. A
/// quant may differ by one step where a GPU's division rounds differently at a tie; more than 0.1% of them,
/// or any by more, fails.
async fn pack(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(37);
    for shape in [vec![3usize, 11usize], vec![3, 32], vec![7, 96], vec![40, 320], vec![5, 64, 3, 3]] {
        let n: usize = shape.iter().product();
        let mut data = rng.uniform(n, -2.0, 2.0);
        data[1] = 0.0;
        let x = Tensor::from_f32(ctx, &[n], &data)?;
        for dtype in [DType::F16, DType::Q8_0, DType::Q4_0] {
            let flat_shape = [shape[0], n / shape[0]];
            if dtype.is_quantized() && !flat_shape[1].is_multiple_of(32) {
                continue;
            }
            let got = ops::pack(ctx, &x, dtype, &flat_shape)?.to_vec_f32(ctx).await?;
            let case = format!("{shape:?} as {dtype}");
            if dtype == DType::F16 {
                r.push(compare("pack", case, &got, &rounded(data.clone(), DType::F16), 1e-7, 1e-3));
                continue;
            }
            let gdtype = if dtype == DType::Q8_0 { GgmlDType::Q8_0 } else { GgmlDType::Q4_0 };
            let want = flat(&QTensor::quantize(&cpu(&data, &flat_shape)?, gdtype)?.dequantize(&Device::Cpu)?)?;
            let step = 2.0 / if dtype == DType::Q8_0 { 127.0 } else { 8.0 } * 1.01;
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            let mut report = compare("pack", case, &got, &want, step, 0.0);
            report.passed &= differ * 1000 <= n;
            report.worst = format!("{differ} of {n} values differ from candle's; {}", report.worst);
            r.push(report);
        }
    }
    Ok(())
}

async fn finite(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let mut rng = Rng::new(31);
    let cases: [(usize, Option<(usize, f32)>); 7] = [
        (1000, None),
        (1000, Some((777, f32::NAN))),
        (1000, Some((0, f32::INFINITY))),
        (1001, Some((1000, f32::NEG_INFINITY))),
        (1001, Some((999, f32::NAN))),
        (300_001, Some((300_000, f32::NAN))),
        (300_001, None),
    ];
    for dtype in [DType::F32, DType::F16] {
        for (n, bad) in cases {
            let mut data = rng.uniform(n, -60000.0, 60000.0);
            if let Some((at, v)) = bad {
                data[at] = v;
            }
            let bytes: Vec<u8> = match dtype {
                DType::F16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                _ => bytemuck::cast_slice(&data).to_vec(),
            };
            // What the tensor holds, as the CPU sees it (f16: after rounding).
            let want = match dtype {
                DType::F16 => data.iter().all(|v| half::f16::from_f32(*v).is_finite()),
                _ => data.iter().all(|v| v.is_finite()),
            };
            let x = Tensor::from_bytes(ctx, &[n], dtype, &bytes)?;
            let got = ops::all_finite(ctx, &x).await?;
            let case = format!("{dtype} n={n} {}", bad.map_or("clean".to_string(), |(at, v)| format!("{v} at {at}")));
            r.push(CheckReport {
                check: "finite",
                case,
                passed: got == want,
                max_abs_err: 0.0,
                worst: format!("gpu says finite: {got}, cpu: {want}"),
                tolerance: "exact".into(),
                skipped: None,
            });
        }
    }
    // f16 overflow: 70000 has no f16, so the stored value is infinite.
    let x = Tensor::from_f32_as(ctx, &[3], &[1.0, 70000.0, 2.0], DType::F16)?;
    let got = ops::all_finite(ctx, &x).await?;
    r.push(CheckReport {
        check: "finite",
        case: "f16 overflow from f32 70000".into(),
        passed: !got,
        max_abs_err: 0.0,
        worst: format!("gpu says finite: {got}"),
        tolerance: "exact".into(),
        skipped: None,
    });
    Ok(())
}

fn expect_error<T>(case: &str, result: Result<T>, needles: &[&str]) -> CheckReport {
    let (passed, worst) = match result {
        Ok(_) => (false, "no error was returned".to_string()),
        Err(e) => {
            let msg = e.to_string();
            let missing: Vec<_> = needles.iter().filter(|n| !msg.contains(**n)).collect();
            (missing.is_empty(), if missing.is_empty() { msg } else { format!("{msg:?} does not mention {missing:?}") })
        }
    };
    CheckReport {
        check: "errors",
        case: case.to_string(),
        passed,
        max_abs_err: 0.0,
        worst,
        tolerance: "an error naming the op and the shapes".into(),
        skipped: None,
    }
}

/// Bad input returns an error that names the op and the shapes, and records nothing.
fn errors(ctx: &GpuContext, r: &mut Vec<CheckReport>) -> Result<()> {
    let t = |shape: &[usize]| Tensor::empty(ctx, "test", shape, DType::F32);
    let (a, b) = (t(&[2, 3])?, t(&[4, 5])?);
    r.push(expect_error(
        "matmul inner dims",
        ops::matmul(ctx, &a, &b, MatmulOpts::default()),
        &["matmul", "[2, 3]", "[4, 5]"],
    ));
    let x = t(&[1, 3, 8, 8])?;
    let w = t(&[4, 2, 3, 3])?;
    r.push(expect_error(
        "conv2d channels",
        ops::conv2d(ctx, &x, &w, (3, 3), None, Conv2dOpts::default()),
        &["conv2d", "[4, 2, 3, 3]", "[1, 3, 8, 8]"],
    ));
    r.push(expect_error("add broadcast", ops::add(ctx, &a, &b), &["add", "[2, 3]", "[4, 5]"]));
    let q = t(&[1, 4, 30])?;
    r.push(expect_error(
        "attention heads",
        ops::attention(ctx, &q, &q, &q, 7, 1.0, false),
        &["attention", "[1, 4, 30]", "7 heads"],
    ));
    let g = t(&[5])?;
    r.push(expect_error(
        "group_norm groups",
        ops::group_norm(ctx, &x, 2, &g, &g, 1e-5, false),
        &["group_norm", "2 groups", "[1, 3, 8, 8]"],
    ));
    let limit = ctx.summary().max_storage_buffer_binding_size.min(ctx.summary().max_buffer_size);
    let too_big = (limit / 4 + 1024) as usize;
    r.push(expect_error(
        "tensor over the binding limit",
        Tensor::empty(ctx, "upload", &[too_big], DType::F32),
        &["upload", &format!("[{too_big}]"), &limit.to_string()],
    ));
    let many = t(&[70_000, 1, 1])?;
    let one = t(&[1, 1])?;
    r.push(expect_error(
        "workgroup grid over the limit",
        ops::matmul(ctx, &many, &one, MatmulOpts::default()),
        &["matmul", "workgroup grid", "[70000, 1, 1]"],
    ));
    let q8 = Tensor::from_f32_as(ctx, &[2, 32], &[0.5; 64], DType::Q8_0)?;
    r.push(expect_error(
        "quantized weights on the wrong side",
        ops::matmul(ctx, &t(&[3, 2])?, &q8, MatmulOpts::default()),
        &["matmul", "q8_0", "[2, 32]"],
    ));
    r.push(expect_error(
        "q8_0 row length",
        Tensor::from_f32_as(ctx, &[2, 20], &[0.0; 40], DType::Q8_0),
        &["upload", "[2, 20]", "32"],
    ));
    if !ctx.has_f16() {
        let h = Tensor::empty(ctx, "test", &[4], DType::F16)?;
        r.push(expect_error("f16 without shader-f16", ops::silu(ctx, &h), &["silu", "shader-f16"]));
        r.push(expect_error("cast without shader-f16", ops::cast(ctx, &a, DType::F16), &["cast", "shader-f16"]));
    }
    // Nothing above may have reached the GPU: the device has no error to report.
    ctx.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn compare_fails_outside_the_tolerance_and_names_the_worst_index() {
        let ok = compare("t", "c".into(), &[1.0, 2.0], &[1.0, 2.00001], 1e-4, 0.0);
        assert!(ok.passed);
        let bad = compare("t", "c".into(), &[1.0, 2.5, 3.0], &[1.0, 2.0, 3.1], 1e-3, 1e-3);
        assert!(!bad.passed);
        assert!(bad.worst.contains("index 1"), "{}", bad.worst);
        assert!(!compare("t", "c".into(), &[f32::NAN], &[0.0], 1.0, 1.0).passed);
        assert!(!compare("t", "c".into(), &[0.0], &[0.0, 1.0], 1.0, 1.0).passed);
    }
}
