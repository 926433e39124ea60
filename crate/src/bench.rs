//! Kernel benchmarks at Stable Diffusion 1.5's shapes (512x512, CFG batch 2): time per call, GFLOP/s for
//! compute-bound kernels and GB/s for memory-bound ones. A program, not a test: it prints figures and JSON.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::gpu::{DType, GpuContext, Tensor};
use crate::ops::{self, Conv2dOpts, MatmulOpts};
use crate::selfcheck::Rng;

/// One kernel on one shape.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub kernel: String,
    pub shape: String,
    pub dtype: String,
    pub weights: String,
    /// Mean milliseconds per call (wall clock over a batch of calls, GPU finished).
    pub ms: f64,
    pub iters: usize,
    pub gflops: Option<f64>,
    pub gbps: Option<f64>,
    pub adapter: String,
    pub backend: String,
}

impl std::fmt::Display for BenchRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = match (self.gflops, self.gbps) {
            (Some(g), _) => format!("{g:>9.1} GFLOP/s"),
            (None, Some(b)) => format!("{b:>9.1} GB/s   "),
            _ => String::new(),
        };
        write!(
            f,
            "{:<14} {:<44} {:<4} {:<5} {:>10.3} ms {rate}",
            self.kernel, self.shape, self.dtype, self.weights, self.ms
        )
    }
}

/// What one benchmark case computes and how much work that is.
enum Work {
    Flops(f64),
    Bytes(f64),
}

struct Case {
    kernel: &'static str,
    shape: String,
    dtype: DType,
    weights: DType,
    work: Work,
    run: RunFn,
}

type RunFn = Box<dyn Fn(&GpuContext) -> Result<Tensor>>;

fn random(ctx: &GpuContext, rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Tensor::from_f32_as(ctx, shape, &rng.uniform(n, -1.0, 1.0), dtype)
}

fn matmul_case(
    ctx: &GpuContext,
    rng: &mut Rng,
    label: &str,
    (m, k, n): (usize, usize, usize),
    dtype: DType,
    w: DType,
) -> Result<Case> {
    let a = random(ctx, rng, &[m, k], dtype)?;
    let b = random(ctx, rng, &[n, k], w)?;
    let bias = random(ctx, rng, &[n], dtype)?;
    Ok(Case {
        kernel: "matmul",
        shape: format!("{label}{m}x{k} . {n}x{k}^T"),
        dtype,
        weights: w,
        work: Work::Flops(2.0 * (m * n * k) as f64),
        run: Box::new(move |ctx| {
            ops::matmul(ctx, &a, &b, MatmulOpts { trans_b: true, bias: Some(&bias), ..Default::default() })
        }),
    })
}

fn conv_case(
    ctx: &GpuContext,
    rng: &mut Rng,
    (b, cin, hw): (usize, usize, usize),
    (cout, k, stride): (usize, usize, usize),
    dtype: DType,
) -> Result<Case> {
    let x = random(ctx, rng, &[b, cin, hw, hw], dtype)?;
    let w = random(ctx, rng, &[cout, cin, k, k], dtype)?;
    let bias = random(ctx, rng, &[cout], dtype)?;
    let pad = k / 2;
    let ho = (hw + 2 * pad - k) / stride + 1;
    Ok(Case {
        kernel: "conv2d",
        shape: format!("{b}x{cin}x{hw}x{hw} -> {cout} k{k} s{stride}"),
        dtype,
        weights: dtype,
        work: Work::Flops(2.0 * (b * cout * ho * ho * cin * k * k) as f64),
        run: Box::new(move |ctx| {
            ops::conv2d(ctx, &x, &w, (k, k), Some(&bias), Conv2dOpts { stride, padding: pad, ..Default::default() })
        }),
    })
}

fn attention_case(
    ctx: &GpuContext,
    rng: &mut Rng,
    (b, lq, lk, heads, d): (usize, usize, usize, usize, usize),
    dtype: DType,
) -> Result<Case> {
    let q = random(ctx, rng, &[b, lq, heads * d], dtype)?;
    let k = random(ctx, rng, &[b, lk, heads * d], dtype)?;
    let v = random(ctx, rng, &[b, lk, heads * d], dtype)?;
    let scale = 1.0 / (d as f32).sqrt();
    Ok(Case {
        kernel: "attention",
        shape: format!("b{b} q{lq} kv{lk} {heads}x{d}"),
        dtype,
        weights: dtype,
        work: Work::Flops(4.0 * (b * heads * lq * lk * d) as f64),
        run: Box::new(move |ctx| ops::attention(ctx, &q, &k, &v, heads, scale, false)),
    })
}

fn cases(ctx: &GpuContext, quick: bool) -> Result<Vec<Case>> {
    let mut rng = Rng::new(42);
    let mut dtypes = vec![DType::F32];
    if ctx.has_f16() {
        dtypes.push(DType::F16);
    }
    let mut v = Vec::new();
    for &dt in &dtypes {
        let esize = if dt == DType::F16 { 2.0 } else { 4.0 };
        if quick {
            v.push(matmul_case(ctx, &mut rng, "", (512, 512, 512), dt, dt)?);
            v.push(matmul_case(ctx, &mut rng, "ff ", (1024, 320, 1280), dt, dt)?);
            v.push(conv_case(ctx, &mut rng, (1, 64, 32), (64, 3, 1), dt)?);
            v.push(attention_case(ctx, &mut rng, (1, 1024, 1024, 8, 40), dt)?);
            v.push(attention_case(ctx, &mut rng, (1, 1024, 77, 8, 40), dt)?);
        } else {
            v.push(matmul_case(ctx, &mut rng, "", (4096, 4096, 4096), dt, dt)?);
            // The UNet's largest linear layers at 64x64 latents, CFG batch 2: GEGLU in, FF out, attention q.
            v.push(matmul_case(ctx, &mut rng, "geglu ", (8192, 320, 2560), dt, dt)?);
            v.push(matmul_case(ctx, &mut rng, "ff_out ", (8192, 1280, 320), dt, dt)?);
            v.push(matmul_case(ctx, &mut rng, "to_q ", (8192, 320, 320), dt, dt)?);
            v.push(conv_case(ctx, &mut rng, (2, 320, 64), (320, 3, 1), dt)?);
            v.push(conv_case(ctx, &mut rng, (2, 640, 32), (640, 3, 1), dt)?);
            v.push(conv_case(ctx, &mut rng, (2, 1280, 16), (1280, 3, 1), dt)?);
            v.push(conv_case(ctx, &mut rng, (2, 320, 64), (320, 3, 2), dt)?);
            v.push(conv_case(ctx, &mut rng, (1, 256, 256), (256, 3, 1), dt)?);
            v.push(attention_case(ctx, &mut rng, (2, 4096, 4096, 8, 40), dt)?);
            v.push(attention_case(ctx, &mut rng, (2, 4096, 77, 8, 40), dt)?);
        }
        // Memory-bound kernels: group norm (+SiLU) over 320x64x64 and a broadcast add.
        let (b, c, hw) = if quick { (1, 320, 32) } else { (2, 320, 64) };
        let x = random(ctx, &mut rng, &[b, c, hw, hw], dt)?;
        let g = random(ctx, &mut rng, &[c], dt)?;
        let beta = random(ctx, &mut rng, &[c], dt)?;
        let bytes = (2 * b * c * hw * hw) as f64 * esize;
        let xg = x.clone();
        v.push(Case {
            kernel: "group_norm",
            shape: format!("{b}x{c}x{hw}x{hw} g32 +silu"),
            dtype: dt,
            weights: dt,
            // Reads x three times (mean, variance, normalize) and writes once.
            work: Work::Bytes(bytes * 2.0),
            run: Box::new(move |ctx| ops::group_norm(ctx, &xg, 32, &g, &beta, 1e-5, true)),
        });
        let y = random(ctx, &mut rng, &[b, c, 1, 1], dt)?;
        v.push(Case {
            kernel: "add",
            shape: format!("{b}x{c}x{hw}x{hw} + {b}x{c}x1x1"),
            dtype: dt,
            weights: dt,
            work: Work::Bytes(bytes),
            run: Box::new(move |ctx| ops::add(ctx, &x, &y)),
        });
        let tokens = if quick { 1024 } else { 8192 };
        let t = random(ctx, &mut rng, &[tokens, 2560], dt)?;
        v.push(Case {
            kernel: "geglu",
            shape: format!("{tokens}x2560"),
            dtype: dt,
            weights: dt,
            work: Work::Bytes((tokens * 2560 * 3 / 2) as f64 * esize),
            run: Box::new(move |ctx| ops::geglu(ctx, &t)),
        });
    }
    // Quantized and f16 weights with f32 activations: the GEGLU projection.
    let (m, k, n) = if quick { (1024, 320, 1280) } else { (8192, 320, 2560) };
    for w in [DType::F16, DType::Q8_0, DType::Q4_0] {
        v.push(matmul_case(ctx, &mut rng, "geglu ", (m, k, n), DType::F32, w)?);
    }
    Ok(v)
}

/// Runs `run` `iters` times in one batch and waits for the GPU.
async fn time(ctx: &GpuContext, run: &dyn Fn(&GpuContext) -> Result<Tensor>, iters: usize) -> Result<Duration> {
    ctx.sync().await?;
    let start = Instant::now();
    for _ in 0..iters {
        drop(run(ctx)?);
    }
    ctx.sync().await?;
    Ok(start.elapsed())
}

/// Benchmarks every kernel; `only` keeps the cases whose kernel or shape contains it.
pub async fn bench_kernels(
    ctx: &GpuContext,
    quick: bool,
    only: Option<&str>,
    mut report: impl FnMut(&BenchRecord),
) -> Result<Vec<BenchRecord>> {
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    let mut records = Vec::new();
    for case in cases(ctx, quick)? {
        if only.is_some_and(|s| !case.kernel.contains(s) && !case.shape.contains(s)) {
            continue;
        }
        // Compile the pipeline and warm up, then size the timed batch to the budget.
        let once = time(ctx, &*case.run, 1).await?;
        let iters = ((budget.as_secs_f64() / once.as_secs_f64().max(1e-6)) as usize).clamp(1, 200);
        let total = time(ctx, &*case.run, iters).await?;
        let secs = total.as_secs_f64() / iters as f64;
        let (gflops, gbps) = match case.work {
            Work::Flops(f) => (Some(f / secs / 1e9), None),
            Work::Bytes(b) => (None, Some(b / secs / 1e9)),
        };
        let summary = ctx.summary();
        let rec = BenchRecord {
            kernel: case.kernel.into(),
            shape: case.shape,
            dtype: case.dtype.name().into(),
            weights: case.weights.name().into(),
            ms: secs * 1e3,
            iters,
            gflops,
            gbps,
            adapter: summary.name.clone(),
            backend: summary.backend.clone(),
        };
        report(&rec);
        records.push(rec);
    }
    Ok(records)
}
