//! Kernel benchmarks at Stable Diffusion 1.5's shapes (512x512, CFG batch 2): time per call, GFLOP/s for
//! compute-bound kernels and GB/s for memory-bound ones. A program, not a test: it prints figures and JSON.

use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::gpu::{CostReport, DType, GpuContext, Tensor};
use crate::ops::{self, Conv2dOpts, LnParams, MatmulOpts, Tile};
use crate::selfcheck::Rng;

/// A monotonic clock that works natively and in a browser (where `std::time::Instant` panics).
#[derive(Clone, Copy)]
pub(crate) struct Instant(f64);

impl Instant {
    pub(crate) fn now() -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            Instant(START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64())
        }
        #[cfg(target_arch = "wasm32")]
        {
            use wasm_bindgen::JsCast;
            let global = js_sys::global();
            let perf = match global.dyn_ref::<web_sys::Window>() {
                Some(w) => w.performance(),
                None => global.dyn_ref::<web_sys::WorkerGlobalScope>().and_then(|w| w.performance()),
            };
            Instant(perf.map_or_else(js_sys::Date::now, |p| p.now()) / 1e3)
        }
    }

    pub(crate) fn elapsed(self) -> Duration {
        Duration::from_secs_f64((Self::now().0 - self.0).max(0.0))
    }
}

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
    /// The GEMM tile a matmul or conv ran on: "small" / "large" (portable, 64 / 128 square), "coop" /
    /// "coop-128" (cooperative matrices, 4 / 8 fragments square); "coop" for attention on cooperative
    /// matrices; "" for other kernels.
    pub tile: String,
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
            "{:<14} {:<44} {:<4} {:<5} {:<19} {:>10.3} ms {rate}",
            self.kernel, self.shape, self.dtype, self.weights, self.tile, self.ms
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
    tile: String,
    dtype: DType,
    weights: DType,
    work: Work,
    /// Makes the case's inputs (only for the cases `--only` keeps, one case at a time) and returns what is
    /// timed.
    setup: Setup,
}

type RunFn = Box<dyn Fn(&GpuContext) -> Result<Tensor>>;
type Setup = Box<dyn FnOnce(&GpuContext, &mut Rng) -> Result<RunFn>>;

fn random(ctx: &GpuContext, rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Tensor::from_f32_as(ctx, shape, &rng.uniform(n, -1.0, 1.0), dtype)
}

/// A linear layer's matmul, (m, k) by (n, k)^T: with `ln`, the attention's q/k/v projection with the
/// transformer block's layer norm fused in (the GEMM normalizes its A rows from statistics each workgroup
/// computes first), else with a bias.
fn matmul_case(
    ctx: &GpuContext,
    label: &str,
    (m, k, n): (usize, usize, usize),
    dtype: DType,
    w: DType,
    tile: Option<Tile>,
    ln: bool,
) -> Case {
    let (tile, tile_name) = resolve_tile(ctx, dtype, tile, (m, n, 1), k);
    Case {
        kernel: "matmul",
        shape: format!("{label}{m}x{k} . {n}x{k}^T"),
        tile: tile_name,
        dtype,
        weights: w,
        work: Work::Flops(2.0 * (m * n * k) as f64),
        setup: Box::new(move |ctx, rng| {
            let a = random(ctx, rng, &[m, k], dtype)?;
            let b = random(ctx, rng, &[n, k], w)?;
            let (bias, ln) = if ln {
                let (g, beta) = (random(ctx, rng, &[k], dtype)?, random(ctx, rng, &[k], dtype)?);
                (None, Some(LnParams::new(ctx, g, beta, 1e-5)?))
            } else {
                (Some(random(ctx, rng, &[n], dtype)?), None)
            };
            Ok(Box::new(move |ctx| {
                let opts = MatmulOpts {
                    trans_b: true,
                    bias: bias.as_ref(),
                    layer_norm: ln.as_ref(),
                    tile,
                    ..Default::default()
                };
                ops::matmul(ctx, &a, &b, opts)
            }))
        }),
    }
}

fn conv_case(
    ctx: &GpuContext,
    (b, cin, hw): (usize, usize, usize),
    (cout, k, stride): (usize, usize, usize),
    dtype: DType,
    tile: Option<Tile>,
) -> Case {
    let pad = k / 2;
    let ho = (hw + 2 * pad - k) / stride + 1;
    let (tile, tile_name) = resolve_tile(ctx, dtype, tile, (ho * ho, cout, b), cin * k * k);
    Case {
        kernel: "conv2d",
        shape: format!("{b}x{cin}x{hw}x{hw} -> {cout} k{k} s{stride}"),
        tile: tile_name,
        dtype,
        weights: dtype,
        work: Work::Flops(2.0 * (b * cout * ho * ho * cin * k * k) as f64),
        setup: Box::new(move |ctx, rng| {
            let x = random(ctx, rng, &[b, cin, hw, hw], dtype)?;
            let w = random(ctx, rng, &[cout, cin, k, k], dtype)?;
            let bias = random(ctx, rng, &[cout], dtype)?;
            Ok(Box::new(move |ctx| {
                let opts = Conv2dOpts { stride, padding: pad, tile, ..Default::default() };
                ops::conv2d(ctx, &x, &w, (k, k), Some(&bias), opts)
            }))
        }),
    }
}

fn attention_case(ctx: &GpuContext, (b, lq, lk, heads, d): (usize, usize, usize, usize, usize), dtype: DType) -> Case {
    let scale = 1.0 / (d as f32).sqrt();
    Case {
        kernel: "attention",
        shape: format!("b{b} q{lq} kv{lk} {heads}x{d}"),
        // f16 attention runs on cooperative matrices where the device has them (ops/attention.rs).
        tile: if dtype == DType::F16 && ctx.coop().is_some() { "coop" } else { "" }.into(),
        dtype,
        weights: dtype,
        work: Work::Flops(4.0 * (b * heads * lq * lk * d) as f64),
        setup: Box::new(move |ctx, rng| {
            let q = random(ctx, rng, &[b, lq, heads * d], dtype)?;
            let k = random(ctx, rng, &[b, lk, heads * d], dtype)?;
            let v = random(ctx, rng, &[b, lk, heads * d], dtype)?;
            Ok(Box::new(move |ctx| ops::attention(ctx, &q, &k, &v, heads, scale, false)))
        }),
    }
}

/// The GEMM tiles a benchmark runs with `dtype` activations: both portable tiles (with `quick`, only the one
/// the shape takes, `None`), and both cooperative matrix tiles where the device has them. Timing every tile on
/// each shape is what a table of tiles by shape is written from.
fn gemm_tiles(ctx: &GpuContext, dtype: DType, quick: bool) -> Vec<Option<Tile>> {
    let mut t = if quick { vec![None] } else { vec![Some(Tile::Small), Some(Tile::Large)] };
    if dtype == DType::F16 && ctx.coop().is_some() {
        t.extend([Some(Tile::Coop), Some(Tile::CoopLarge)]);
    }
    t
}

/// The tile a case (an (m, n, batch) output over k) runs on: `tile`, else the portable one for the shape; its
/// name ends in `*` where it is the tile the op takes for the shape by default, and says into how many
/// chunks split-K cuts k, if it does (`latent-gen --split-k N`).
fn resolve_tile(
    ctx: &GpuContext,
    dtype: DType,
    tile: Option<Tile>,
    shape: (usize, usize, usize),
    k: usize,
) -> (Option<Tile>, String) {
    let tile = tile.unwrap_or(Tile::for_shape(shape.0, shape.1, shape.2));
    let name = match tile {
        Tile::Small => "small",
        Tile::Large => "large",
        Tile::Coop => "coop",
        Tile::CoopLarge => "coop-128",
    };
    let default = if Tile::default_for(ctx, dtype, shape) == tile { "*" } else { "" };
    let splits = match ops::split_k_chunks(ctx, tile, (shape.0, shape.1, k, shape.2)) {
        1 => String::new(),
        s => format!(" split-K {s}"),
    };
    (Some(tile), format!("{name}{default}{splits}"))
}

fn cases(ctx: &GpuContext, quick: bool) -> Vec<Case> {
    let mut dtypes = vec![DType::F32];
    if ctx.has_f16() {
        dtypes.push(DType::F16);
    }
    let mut v = Vec::new();
    for &dt in &dtypes {
        let esize = if dt == DType::F16 { 2.0 } else { 4.0 };
        for tile in gemm_tiles(ctx, dt, quick) {
            if quick {
                v.push(matmul_case(ctx, "", (512, 512, 512), dt, dt, tile, false));
                v.push(matmul_case(ctx, "ff ", (1024, 320, 1280), dt, dt, tile, false));
                v.push(matmul_case(ctx, "ln+qkv ", (1024, 320, 960), dt, dt, tile, true));
                v.push(conv_case(ctx, (1, 64, 32), (64, 3, 1), dt, tile));
            } else {
                v.push(matmul_case(ctx, "", (4096, 4096, 4096), dt, dt, tile, false));
                // The UNet's largest linear layers at 64x64 latents, CFG batch 2: GEGLU in, FF out, attention q.
                v.push(matmul_case(ctx, "geglu ", (8192, 320, 2560), dt, dt, tile, false));
                v.push(matmul_case(ctx, "ff_out ", (8192, 1280, 320), dt, dt, tile, false));
                v.push(matmul_case(ctx, "to_q ", (8192, 320, 320), dt, dt, tile, false));
                v.push(matmul_case(ctx, "ln+qkv ", (8192, 320, 960), dt, dt, tile, true));
                v.push(conv_case(ctx, (2, 320, 64), (320, 3, 1), dt, tile));
                v.push(conv_case(ctx, (2, 640, 32), (640, 3, 1), dt, tile));
                v.push(conv_case(ctx, (2, 1280, 16), (1280, 3, 1), dt, tile));
                // The lowest level (8x8 latents): 40 workgroups of 64x64 for 2 x 64 x 1280 outputs, each running
                // k = 11520 alone; whether that leaves a big GPU idle (the case for split-K) shows here.
                v.push(conv_case(ctx, (2, 1280, 8), (1280, 3, 1), dt, tile));
                v.push(conv_case(ctx, (2, 320, 64), (320, 3, 2), dt, tile));
                v.push(conv_case(ctx, (1, 256, 256), (256, 3, 1), dt, tile));
            }
        }
        if quick {
            v.push(attention_case(ctx, (1, 1024, 1024, 8, 40), dt));
            v.push(attention_case(ctx, (1, 1024, 77, 8, 40), dt));
        } else {
            v.push(attention_case(ctx, (2, 4096, 4096, 8, 40), dt));
            v.push(attention_case(ctx, (2, 4096, 77, 8, 40), dt));
        }
        // Memory-bound kernels: group norm (+SiLU) over 320x64x64 and a broadcast add.
        let (b, c, hw) = if quick { (1, 320, 32) } else { (2, 320, 64) };
        let bytes = (2 * b * c * hw * hw) as f64 * esize;
        v.push(Case {
            kernel: "group_norm",
            tile: String::new(),
            shape: format!("{b}x{c}x{hw}x{hw} g32 +silu"),
            dtype: dt,
            weights: dt,
            // Reads x three times (mean, variance, normalize) and writes once.
            work: Work::Bytes(bytes * 2.0),
            setup: Box::new(move |ctx, rng| {
                let x = random(ctx, rng, &[b, c, hw, hw], dt)?;
                let g = random(ctx, rng, &[c], dt)?;
                let beta = random(ctx, rng, &[c], dt)?;
                Ok(Box::new(move |ctx| ops::group_norm(ctx, &x, 32, &g, &beta, 1e-5, true)))
            }),
        });
        v.push(Case {
            kernel: "add",
            tile: String::new(),
            shape: format!("{b}x{c}x{hw}x{hw} + {b}x{c}x1x1"),
            dtype: dt,
            weights: dt,
            work: Work::Bytes(bytes),
            setup: Box::new(move |ctx, rng| {
                let x = random(ctx, rng, &[b, c, hw, hw], dt)?;
                let y = random(ctx, rng, &[b, c, 1, 1], dt)?;
                Ok(Box::new(move |ctx| ops::add(ctx, &x, &y)))
            }),
        });
        let tokens = if quick { 1024 } else { 8192 };
        v.push(Case {
            kernel: "geglu",
            tile: String::new(),
            shape: format!("{tokens}x2560"),
            dtype: dt,
            weights: dt,
            work: Work::Bytes((tokens * 2560 * 3 / 2) as f64 * esize),
            setup: Box::new(move |ctx, rng| {
                let t = random(ctx, rng, &[tokens, 2560], dt)?;
                Ok(Box::new(move |ctx| ops::geglu(ctx, &t)))
            }),
        });
    }
    // Quantized and f16 weights with f32 activations: the GEGLU projection.
    let (m, k, n) = if quick { (1024, 320, 1280) } else { (8192, 320, 2560) };
    for w in [DType::F16, DType::Q8_0, DType::Q4_0] {
        v.push(matmul_case(ctx, "geglu ", (m, k, n), DType::F32, w, None, false));
    }
    v
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

/// Benchmarks every kernel; `only` keeps the cases whose kernel or shape contains one of its comma-separated
/// parts.
pub async fn bench_kernels(
    ctx: &GpuContext,
    quick: bool,
    only: Option<&str>,
    mut report: impl FnMut(&BenchRecord),
) -> Result<Vec<BenchRecord>> {
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    let mut records = Vec::new();
    let mut rng = Rng::new(42);
    for case in cases(ctx, quick) {
        if only.is_some_and(|s| !s.split(',').any(|s| case.kernel.contains(s) || case.shape.contains(s))) {
            continue;
        }
        let run = (case.setup)(ctx, &mut rng)?;
        // Compile the pipeline and warm up, then size the timed batch to the budget.
        let once = time(ctx, &*run, 1).await?;
        let iters = ((budget.as_secs_f64() / once.as_secs_f64().max(1e-6)) as usize).clamp(1, 200);
        let total = time(ctx, &*run, iters).await?;
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
            tile: case.tile,
            adapter: summary.name.clone(),
            backend: summary.backend.clone(),
        };
        report(&rec);
        records.push(rec);
    }
    Ok(records)
}

/// The architectures `bench pipeline` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// Stable Diffusion 1.5: CLIP ViT-L/14, the 860M UNet, CFG.
    Sd15,
    /// SD-Turbo (SD 2.1 architecture): OpenCLIP ViT-H text tower (23 layers), linear projections.
    SdTurbo,
}

impl std::str::FromStr for Arch {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd15" => Ok(Arch::Sd15),
            "sd-turbo" => Ok(Arch::SdTurbo),
            _ => Err(crate::Error::Invalid(format!("unknown architecture {s:?}: sd15 or sd-turbo"))),
        }
    }
}

/// The configs of an architecture, as their repositories' config.json files give them.
fn arch_configs(arch: Arch) -> (&'static str, &'static str) {
    const SD15_CLIP: &str = r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "hidden_act": "quick_gelu", "max_position_embeddings": 77}"#;
    const SD15_UNET: &str = r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
    const TURBO_CLIP: &str = r#"{"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
        "num_attention_heads": 16, "hidden_act": "gelu", "max_position_embeddings": 77}"#;
    const TURBO_UNET: &str = r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 64,
        "use_linear_projection": true,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
    match arch {
        Arch::Sd15 => (SD15_CLIP, SD15_UNET),
        Arch::SdTurbo => (TURBO_CLIP, TURBO_UNET),
    }
}

const VAE: &str = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215}"#;
const TAESD: &str = r#"{"encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1]}"#;

/// What `bench pipeline` measured.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineBench {
    pub arch: Arch,
    pub width: usize,
    pub height: usize,
    pub act: String,
    pub weights: String,
    /// Whether f16 GEMMs ran on cooperative matrices (tensor cores).
    pub coop: bool,
    pub adapter: String,
    pub backend: String,
    /// Building the models and uploading the (random) weights.
    pub load_s: f64,
    /// The text encoder on a batch of 2 (prompt and negative prompt).
    pub clip_ms: f64,
    /// One UNet evaluation at batch 2 (a classifier-free-guidance step).
    pub unet_cfg_step_ms: f64,
    /// One UNet evaluation at batch 1 (a step without guidance, as SD-Turbo and LCM at guidance 1 run).
    pub unet_step_b1_ms: f64,
    /// The whole decode: the time of one tile times the tiles when the device's limits make it tiled.
    pub vae_decode_ms: f64,
    /// Tiles the VAE decode runs in (1: whole).
    pub vae_decode_tiles: usize,
    pub taesd_decode_ms: f64,
    /// The most GPU memory the tensor pool held at once (weights and activations).
    pub peak_gpu_bytes: u64,
    /// One UNet CFG step's dispatches, bytes bound (read + written), the least those ops could move, and
    /// FLOPs; `unet_step_cost` breaks them down by op family (with GPU time where timestamps exist).
    pub unet_step_dispatches: u64,
    pub unet_step_bytes: u64,
    pub unet_step_bytes_min: u64,
    pub unet_step_gflop: f64,
    pub unet_step_cost: CostReport,
    pub vae_decode_cost: CostReport,
}

impl std::fmt::Display for PipelineBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:?} at {}x{}, {} activations, {} weights, on {} ({})",
            self.arch, self.width, self.height, self.act, self.weights, self.adapter, self.backend
        )?;
        writeln!(f, "load (random weights)    {:>10.2} s", self.load_s)?;
        writeln!(f, "CLIP, batch 2            {:>10.2} ms", self.clip_ms)?;
        writeln!(f, "UNet CFG step, batch 2   {:>10.2} ms", self.unet_cfg_step_ms)?;
        writeln!(f, "UNet step, batch 1       {:>10.2} ms", self.unet_step_b1_ms)?;
        writeln!(f, "VAE decode               {:>10.2} ms", self.vae_decode_ms)?;
        writeln!(f, "TAESD decode             {:>10.2} ms", self.taesd_decode_ms)?;
        writeln!(f, "peak GPU memory          {:>10.1} MiB", self.peak_gpu_bytes as f64 / (1 << 20) as f64)?;
        write!(f, "UNet CFG step: {}", self.unet_step_cost)?;
        write!(f, "VAE decode: {}", self.vae_decode_cost)
    }
}

/// Times each network of `arch` built with random weights at `size` x `size` (`repeat` runs after a warm-up,
/// the mean reported).
pub async fn bench_pipeline(
    ctx: &GpuContext,
    arch: Arch,
    size: usize,
    policy: crate::weights::LoadPolicy,
    repeat: usize,
    mut progress: impl FnMut(&str),
) -> Result<PipelineBench> {
    use crate::models::{clip, parse_config, taesd, unet_2d, vae};
    let (clip_cfg, unet_cfg) = arch_configs(arch);
    let src = random_weights(policy);
    let w = crate::weights::Weights::new(ctx, &src, policy);
    let start = Instant::now();
    progress("building the models with random weights");
    let clip = clip::ClipTextModel::load(&w, parse_config(clip_cfg, "clip")?)?;
    let unet = unet_2d::UNet2DConditionModel::load(&w, parse_config(unet_cfg, "unet")?)?;
    let vae_config: vae::VaeConfig = parse_config(VAE, "vae")?;
    let decoder = vae::Decoder::load(&w, &vae_config)?;
    let tiny = taesd::TinyDecoder::load(&w, &parse_config(TAESD, "taesd")?)?;
    ctx.sync().await?;
    let load_s = start.elapsed().as_secs_f64();
    let act = policy.act;
    let lat = size / 8;
    let mut rng = Rng::new(3);
    let mut time_it = async |name: &str, run: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        progress(&format!("{name}: warm-up"));
        drop(run()?);
        ctx.sync().await?;
        let t = Instant::now();
        for _ in 0..repeat {
            drop(run()?);
        }
        ctx.sync().await?;
        let ms = t.elapsed().as_secs_f64() * 1e3 / repeat as f64;
        progress(&format!("{name}: {ms:.2} ms"));
        Ok(ms)
    };
    let ids: Vec<Vec<u32>> = (0..2).map(|i| (0..77).map(|t| ((t * 7919 + i) % 49406) as u32).collect()).collect();
    let clip_ms = time_it("CLIP", &|| clip.forward(ctx, &ids)).await?;
    let context = clip.forward(ctx, &ids)?;
    let sample = Tensor::from_f32_as(ctx, &[2, 4, lat, lat], &rng.uniform(2 * 4 * lat * lat, -1.0, 1.0), act)?;
    let unet_ms = time_it("UNet CFG step", &|| unet.forward(ctx, &sample, 500.0, &context, None)).await?;
    // Cross-attention's keys and values for `context` are cached now, as in a generation's later steps.
    let unet_cost = cost(ctx, &|| unet.forward(ctx, &sample, 500.0, &context, None)).await?;
    let sample1 = Tensor::from_f32_as(ctx, &[1, 4, lat, lat], &rng.uniform(4 * lat * lat, -1.0, 1.0), act)?;
    let context1 = clip.forward(ctx, &ids[..1])?;
    let unet_b1_ms = time_it("UNet step, batch 1", &|| unet.forward(ctx, &sample1, 500.0, &context1, None)).await?;
    let (side, tiles) = vae_tiles(ctx, &decoder, lat, act)?;
    let z = Tensor::from_f32_as(ctx, &[1, 4, side, side], &rng.uniform(4 * side * side, -1.0, 1.0), act)?;
    let vae_ms = time_it("VAE decode", &|| decoder.forward(ctx, &z)).await? * tiles as f64;
    let zfull = Tensor::from_f32_as(ctx, &[1, 4, lat, lat], &rng.uniform(4 * lat * lat, -1.0, 1.0), act)?;
    let taesd_ms = time_it("TAESD decode", &|| tiny.forward(ctx, &zfull)).await?;
    let vae_cost = cost(ctx, &|| decoder.forward(ctx, &z)).await?;
    let s = ctx.summary();
    Ok(PipelineBench {
        arch,
        width: size,
        height: size,
        act: act.name().into(),
        weights: policy.weights.name().into(),
        coop: act == DType::F16 && ctx.coop().is_some(),
        adapter: s.name.clone(),
        backend: s.backend.clone(),
        load_s,
        clip_ms,
        unet_cfg_step_ms: unet_ms,
        unet_step_b1_ms: unet_b1_ms,
        vae_decode_ms: vae_ms,
        vae_decode_tiles: tiles,
        taesd_decode_ms: taesd_ms,
        peak_gpu_bytes: ctx.pool_stats().peak_bytes,
        unet_step_dispatches: unet_cost.dispatches,
        unet_step_bytes: unet_cost.bytes_read + unet_cost.bytes_written,
        unet_step_bytes_min: unet_cost.bytes_min,
        unet_step_gflop: unet_cost.flops as f64 / 1e9,
        unet_step_cost: unet_cost,
        vae_decode_cost: vae_cost,
    })
}

/// What a real-size model needs, counted without running it (a dry run: kernels checked, outputs allocated,
/// nothing dispatched): memory and the cost of each part.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineCount {
    pub arch: Arch,
    pub width: usize,
    pub height: usize,
    pub act: String,
    pub weights: String,
    /// GPU memory the weights of CLIP, the UNet, the VAE decoder and TAESD take.
    pub weight_bytes: u64,
    /// The most GPU memory the tensor pool held at once: weights and the largest part's activations.
    pub peak_gpu_bytes: u64,
    pub clip_cost: CostReport,
    pub unet_step_cost: CostReport,
    pub vae_decode_cost: CostReport,
}

impl std::fmt::Display for PipelineCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "{:?} at {}x{}, {} activations, {} weights (counted, not run)",
            self.arch, self.width, self.height, self.act, self.weights
        )?;
        writeln!(f, "weights                  {:>10.1} MiB", mib(self.weight_bytes))?;
        writeln!(f, "peak GPU memory          {:>10.1} MiB", mib(self.peak_gpu_bytes))?;
        write!(f, "CLIP, batch 2: {}", self.clip_cost)?;
        write!(f, "UNet CFG step: {}", self.unet_step_cost)?;
        write!(f, "VAE decode: {}", self.vae_decode_cost)
    }
}

/// Counts `arch` at `size` x `size` without running it (see [`PipelineCount`]).
pub async fn count_pipeline(
    ctx: &GpuContext,
    arch: Arch,
    size: usize,
    policy: crate::weights::LoadPolicy,
    mut progress: impl FnMut(&str),
) -> Result<PipelineCount> {
    use crate::models::{clip, parse_config, taesd, unet_2d, vae};
    let (clip_cfg, unet_cfg) = arch_configs(arch);
    let src = random_weights(policy);
    let w = crate::weights::Weights::new(ctx, &src, policy);
    progress("building the models with random weights");
    let clip = clip::ClipTextModel::load(&w, parse_config(clip_cfg, "clip")?)?;
    let unet = unet_2d::UNet2DConditionModel::load(&w, parse_config(unet_cfg, "unet")?)?;
    let vae_config: vae::VaeConfig = parse_config(VAE, "vae")?;
    let decoder = vae::Decoder::load(&w, &vae_config)?;
    let tiny = taesd::TinyDecoder::load(&w, &parse_config(TAESD, "taesd")?)?;
    ctx.sync().await?;
    let weight_bytes = ctx.pool_stats().live_bytes;
    let lat = size / 8;
    let act = policy.act;
    let mut rng = Rng::new(3);
    ctx.set_dry_run(true);
    let counted = async {
        progress("counting");
        let ids: Vec<Vec<u32>> = (0..2).map(|i| (0..77).map(|t| ((t * 7919 + i) % 49406) as u32).collect()).collect();
        let clip_cost = cost(ctx, &|| clip.forward(ctx, &ids)).await?;
        let context = clip.forward(ctx, &ids)?;
        let sample = Tensor::from_f32_as(ctx, &[2, 4, lat, lat], &rng.uniform(2 * 4 * lat * lat, -1.0, 1.0), act)?;
        drop(unet.forward(ctx, &sample, 999.0, &context, None)?);
        let unet_step_cost = cost(ctx, &|| unet.forward(ctx, &sample, 500.0, &context, None)).await?;
        let st = ctx.pool_stats();
        progress(&format!(
            "peak after the UNet step: {:.1} MiB (live {:.1})",
            st.peak_bytes as f64 / (1 << 20) as f64,
            st.peak_live_bytes as f64 / (1 << 20) as f64
        ));
        let (side, tiles) = vae_tiles(ctx, &decoder, lat, act)?;
        let z = Tensor::from_f32_as(ctx, &[1, 4, side, side], &rng.uniform(4 * side * side, -1.0, 1.0), act)?;
        let vae_decode_cost = cost(ctx, &|| decoder.forward(ctx, &z)).await?;
        if tiles > 1 {
            progress(&format!("the VAE decodes in {tiles} tiles of {side}x{side} latents: one tile counted"));
        }
        drop(tiny.forward(ctx, &z)?);
        let st = ctx.pool_stats();
        progress(&format!(
            "peak: {:.1} MiB (live {:.1})",
            st.peak_bytes as f64 / (1 << 20) as f64,
            st.peak_live_bytes as f64 / (1 << 20) as f64
        ));
        Ok::<_, crate::Error>((clip_cost, unet_step_cost, vae_decode_cost))
    }
    .await;
    ctx.set_dry_run(false);
    let (clip_cost, unet_step_cost, vae_decode_cost) = counted?;
    Ok(PipelineCount {
        arch,
        width: size,
        height: size,
        act: act.name().into(),
        weights: policy.weights.name().into(),
        weight_bytes,
        peak_gpu_bytes: ctx.pool_stats().peak_bytes,
        clip_cost,
        unet_step_cost,
        vae_decode_cost,
    })
}

/// The latent side `decoder` decodes a `lat` x `lat` latent at on this device, and in how many tiles: the
/// pipeline's tiled decode when the whole one exceeds its budget (512x512 on 128 MiB devices).
fn vae_tiles(
    ctx: &GpuContext,
    decoder: &crate::models::vae::Decoder,
    lat: usize,
    act: DType,
) -> Result<(usize, usize)> {
    let limit = crate::pipeline::vae_tile_budget(ctx);
    if decoder.largest_activation_bytes(lat, lat, act) <= limit {
        return Ok((lat, 1));
    }
    let t = decoder.decode_tile(limit, act).ok_or_else(|| {
        crate::Error::Invalid(format!("the VAE decoder does not fit this device's {limit}-byte bindings"))
    })?;
    let per_side = (0..lat).step_by(t * 3 / 4).count();
    Ok((t, per_side * per_side))
}

/// Random weights for `policy`: q4_0 blocks made directly when it asks for q4_0 (no quantizing).
fn random_weights(policy: crate::weights::LoadPolicy) -> crate::weights::RandomWeights {
    if policy.weights == DType::Q4_0 {
        crate::weights::RandomWeights::q4_0(7)
    } else {
        crate::weights::RandomWeights::new(7)
    }
}

/// What `bench unet` (and the diagnostics page's benchmark) measured: one architecture's UNet alone.
#[derive(Clone, Debug, Serialize)]
pub struct UnetBench {
    pub arch: Arch,
    /// Widths divided by this (1: the real model).
    pub narrow: usize,
    pub width: usize,
    pub height: usize,
    pub act: String,
    pub weights: String,
    pub adapter: String,
    pub backend: String,
    pub load_s: f64,
    /// One UNet evaluation at batch 2 (a classifier-free-guidance step), mean of the timed runs.
    pub unet_cfg_step_ms: f64,
    pub unet_step_dispatches: u64,
    pub peak_gpu_bytes: u64,
    /// The threads the CPU path's kernels split over ([`crate::ops::cpu_threads`]); 0 on a GPU.
    pub cpu_threads: usize,
    /// On the CPU path, the wall time of one step by op family, in ms (empty on a GPU), largest first.
    pub cpu_op_ms: Vec<(String, f64)>,
}

/// Times `arch`'s UNet (widths / `narrow`) with random weights at `size` x `size`, CFG batch 2: `repeat`
/// runs after a warm-up. What a browser can afford to measure of any GPU without a download.
pub async fn bench_unet(
    ctx: &GpuContext,
    arch: Arch,
    narrow: usize,
    size: usize,
    policy: crate::weights::LoadPolicy,
    repeat: usize,
    progress: impl FnMut(&str),
) -> Result<UnetBench> {
    Ok(bench_unet_with(ctx, arch, narrow, size, policy, repeat, None, progress).await?.0)
}

/// What a UNet benchmark ran on and what came out, for checking another implementation on the same inputs:
/// `sample` (2, 4, h, w), `context` (2, 77, d), the timestep, and the UNet's output.
pub struct UnetIo {
    pub sample: (Vec<usize>, Vec<f32>),
    pub context: (Vec<usize>, Vec<f32>),
    pub timestep: f32,
    pub out: (Vec<usize>, Vec<f32>),
}

/// [`bench_unet`] with the weights from `src` (a diffusers UNet's tensors; default: random), also returning
/// its inputs and output.
#[allow(clippy::too_many_arguments)]
pub async fn bench_unet_with(
    ctx: &GpuContext,
    arch: Arch,
    narrow: usize,
    size: usize,
    policy: crate::weights::LoadPolicy,
    repeat: usize,
    src: Option<&dyn crate::weights::TensorSource>,
    mut progress: impl FnMut(&str),
) -> Result<(UnetBench, UnetIo)> {
    let cfg = unet_config(arch, narrow)?;
    let lat = size / 8;
    if lat == 0 || !lat.is_multiple_of(cfg.downsampling()) {
        return Err(crate::Error::Invalid(format!("a {size}x{size} image does not fit the UNet's downsampling")));
    }
    let context_dim = match &cfg.cross_attention_dim {
        crate::models::PerBlock::One(d) => *d,
        crate::models::PerBlock::Each(d) => d[0],
    };
    let random = random_weights(policy);
    let src = src.unwrap_or(&random);
    progress(&format!("building the UNet from {}", src.label()));
    let start = Instant::now();
    let unet =
        crate::models::unet_2d::UNet2DConditionModel::load(&crate::weights::Weights::new(ctx, src, policy), cfg)?;
    ctx.sync().await?;
    let load_s = start.elapsed().as_secs_f64();
    let mut rng = Rng::new(3);
    let sample = Tensor::from_f32_as(ctx, &[2, 4, lat, lat], &rng.uniform(2 * 4 * lat * lat, -1.0, 1.0), policy.act)?;
    let context =
        Tensor::from_f32_as(ctx, &[2, 77, context_dim], &rng.uniform(2 * 77 * context_dim, -1.0, 1.0), policy.act)?;
    progress("warm-up step");
    drop(unet.forward(ctx, &sample, 999.0, &context, None)?);
    ctx.sync().await?;
    let t = Instant::now();
    for i in 0..repeat {
        progress(&format!("timed step {} of {repeat}", i + 1));
        drop(unet.forward(ctx, &sample, 500.0, &context, None)?);
        ctx.sync().await?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / repeat.max(1) as f64;
    // One more step, for its output (and, on the CPU path, its time by op family).
    let (out, cpu_op_ms) = crate::ops::cpu_profile(|| unet.forward(ctx, &sample, 500.0, &context, None));
    let out = out?;
    let io = UnetIo {
        sample: (sample.shape().to_vec(), sample.to_vec_f32(ctx).await?),
        context: (context.shape().to_vec(), context.to_vec_f32(ctx).await?),
        timestep: 500.0,
        out: (out.shape().to_vec(), out.to_vec_f32(ctx).await?),
    };
    drop(out);
    // The CPU fallback has no dispatches to count (and counting would run another step).
    let dispatches = if ctx.is_cpu() {
        0
    } else {
        cost(ctx, &|| unet.forward(ctx, &sample, 500.0, &context, None)).await?.dispatches
    };
    let s = ctx.summary();
    let bench = UnetBench {
        arch,
        narrow,
        width: size,
        height: size,
        act: policy.act.name().into(),
        weights: policy.weights.name().into(),
        adapter: s.name.clone(),
        backend: s.backend.clone(),
        load_s,
        unet_cfg_step_ms: ms,
        unet_step_dispatches: dispatches,
        cpu_threads: if ctx.is_cpu() { crate::ops::cpu_threads() } else { 0 },
        cpu_op_ms,
        peak_gpu_bytes: ctx.pool_stats().peak_bytes,
    };
    Ok((bench, io))
}

/// What one run of `run` costs (dispatches, bytes, FLOPs, GPU time per op family where the device has
/// timestamp queries).
async fn cost(ctx: &GpuContext, run: &dyn Fn() -> Result<Tensor>) -> Result<CostReport> {
    ctx.cost_begin(true)?;
    let out = run();
    let report = ctx.cost_end().await;
    drop(out?);
    report
}

/// The UNet config of `arch` with every width divided by `narrow` (1: the real one): the same blocks,
/// layers and dispatches at a fraction of the weights, for counting a step's cost in tests.
pub fn unet_config(arch: Arch, narrow: usize) -> Result<crate::models::unet_2d::UNetConfig> {
    let mut cfg: crate::models::unet_2d::UNetConfig = crate::models::parse_config(arch_configs(arch).1, "unet")?;
    if narrow > 1 {
        if cfg
            .block_out_channels
            .iter()
            .any(|c| !c.is_multiple_of(narrow) || !(c / narrow).is_multiple_of(cfg.norm_num_groups))
        {
            return Err(crate::Error::Invalid(format!("unet widths are not divisible by {narrow} in groups")));
        }
        cfg.block_out_channels.iter_mut().for_each(|c| *c /= narrow);
    }
    Ok(cfg)
}

/// One UNet CFG step's cost (batch 2 at `latent` x `latent`) for `arch` narrowed by `narrow` (see
/// [`unet_config`]), with random weights: a step after the first, as in a generation.
pub async fn unet_step_cost(
    ctx: &GpuContext,
    arch: Arch,
    narrow: usize,
    latent: usize,
    policy: crate::weights::LoadPolicy,
) -> Result<CostReport> {
    let src = crate::weights::RandomWeights::new(7);
    let w = crate::weights::Weights::new(ctx, &src, policy);
    let cfg = unet_config(arch, narrow)?;
    let context_dim = match &cfg.cross_attention_dim {
        crate::models::PerBlock::One(d) => *d,
        crate::models::PerBlock::Each(d) => d[0],
    };
    let unet = crate::models::unet_2d::UNet2DConditionModel::load(&w, cfg)?;
    let mut rng = Rng::new(3);
    let sample = Tensor::from_f32_as(
        ctx,
        &[2, 4, latent, latent],
        &rng.uniform(2 * 4 * latent * latent, -1.0, 1.0),
        policy.act,
    )?;
    let context =
        Tensor::from_f32_as(ctx, &[2, 77, context_dim], &rng.uniform(2 * 77 * context_dim, -1.0, 1.0), policy.act)?;
    // A step after the first: cross-attention's keys and values are computed once per prompt.
    drop(unet.forward(ctx, &sample, 999.0, &context, None)?);
    cost(ctx, &|| unet.forward(ctx, &sample, 500.0, &context, None)).await
}

/// Records the tensors a model asks for while answering with [`crate::weights::RandomWeights`]'.
#[cfg(not(target_arch = "wasm32"))]
struct Recorder {
    random: crate::weights::RandomWeights,
    seen: std::cell::RefCell<Vec<(String, Vec<usize>)>>,
}

#[cfg(not(target_arch = "wasm32"))]
impl crate::weights::TensorSource for Recorder {
    fn tensor(&self, _name: &str) -> Option<crate::weights::HostTensor<'_>> {
        None
    }

    fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Option<crate::weights::HostTensor<'_>> {
        self.seen.borrow_mut().push((name.to_string(), shape.to_vec()));
        self.random.tensor_shaped(name, shape)
    }

    fn label(&self) -> String {
        "random weights".into()
    }
}

/// Writes `arch` with random weights (the benchmark's: uniform in +-1/sqrt(fan_in), norms 1, biases 0) as an
/// f16 diffusers folder at `dir` with its real configs, tokenizer and scheduler: a real-size model to load
/// without a download (SD 1.5: 2.1 GB; SD-Turbo: 2.6 GB). Tensor names and shapes are the ones our models
/// load, recorded by building them on the CPU.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_random_model(arch: Arch, dir: &std::path::Path, mut progress: impl FnMut(&str)) -> Result<u64> {
    use crate::models::{clip, parse_config, unet_2d, vae};
    use crate::weights::{SafetensorsPlan, TensorSource, Weights, write_safetensors};
    let io = |p: &std::path::Path, e: std::io::Error| crate::Error::Invalid(format!("{}: {e}", p.display()));
    let (clip_cfg, unet_cfg) = arch_configs(arch);
    let turbo = arch == Arch::SdTurbo;
    let scheduler = if turbo {
        serde_json::json!({"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "timestep_spacing": "trailing", "steps_offset": 1})
    } else {
        serde_json::json!({"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1})
    };
    let pad = if turbo { "!" } else { "<|endoftext|>" };
    let mut clip_json: serde_json::Value = serde_json::from_str(clip_cfg).expect("valid");
    clip_json["architectures"] = serde_json::json!(["CLIPTextModel"]);
    let texts = [
        ("model_index.json", serde_json::json!({"_class_name": "StableDiffusionPipeline"}).to_string()),
        ("text_encoder/config.json", clip_json.to_string()),
        ("unet/config.json", unet_cfg.to_string()),
        ("vae/config.json", VAE.to_string()),
        ("scheduler/scheduler_config.json", scheduler.to_string()),
        ("tokenizer/vocab.json", crate::tokenizer::clip_vocab_json(crate::tokenizer::CLIP_MERGES)),
        ("tokenizer/merges.txt", crate::tokenizer::CLIP_MERGES.to_string()),
        ("tokenizer/tokenizer_config.json", serde_json::json!({"pad_token": pad, "model_max_length": 77}).to_string()),
    ];
    for (path, text) in &texts {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("in a folder")).map_err(|e| io(&p, e))?;
        std::fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    let ctx = GpuContext::cpu();
    let policy = crate::weights::LoadPolicy::F32;
    let mut total = 0;
    let parts = [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ];
    for (i, path) in parts.iter().enumerate() {
        progress(&format!("recording the tensors of {path}"));
        let rec = Recorder { random: crate::weights::RandomWeights::new(i as u64), seen: Default::default() };
        let w = Weights::new(&ctx, &rec, policy);
        match i {
            0 => drop(clip::ClipTextModel::load(&w, parse_config(clip_cfg, "clip")?)?),
            1 => drop(unet_2d::UNet2DConditionModel::load(&w, parse_config(unet_cfg, "unet")?)?),
            _ => {
                let cfg: vae::VaeConfig = parse_config(VAE, "vae")?;
                drop(vae::Encoder::load(&w, &cfg)?);
                drop(vae::Decoder::load(&w, &cfg)?);
            }
        }
        let seen = rec.seen.into_inner();
        let plans: Vec<SafetensorsPlan> = seen
            .iter()
            .map(|(name, shape)| SafetensorsPlan {
                name: name.clone(),
                shape: shape.clone(),
                dtype: safetensors::Dtype::F16,
            })
            .collect();
        progress(&format!("writing {path}: {} tensors", plans.len()));
        let p = dir.join(path);
        let file = std::fs::File::create(&p).map_err(|e| io(&p, e))?;
        let mut out = std::io::BufWriter::new(file);
        let random = crate::weights::RandomWeights::new(i as u64);
        total += write_safetensors(&mut out, &Default::default(), &plans, |k| {
            let (name, shape) = &seen[k];
            Ok(random.tensor_shaped(name, shape).expect("made up").data.into_owned())
        })?;
        std::io::Write::flush(&mut out).map_err(|e| io(&p, e))?;
    }
    Ok(total)
}
