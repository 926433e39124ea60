//! The `latent-gen` command line: generation, adapter info and benchmarks.

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::Instant;

    use clap::{Parser, Subcommand, ValueEnum};
    use latent_gen::compose::{self, Axis};
    use latent_gen::gpu::{ContextOptions, DType, GpuContext, Tuning};
    use latent_gen::image::Image;
    use latent_gen::pipeline::{Adapters, Control, InitImage, Request, StableDiffusion};
    use latent_gen::schedulers::SchedulerKind;
    use latent_gen::weights::LoadPolicy;
    use latent_gen::weights::embedding::Embedding;
    use latent_gen::weights::lora::Lora;

    /// The model generation falls back to when no --model is given: the bundled tiny model.
    const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../www/models/tiny-shapes");

    #[derive(Parser)]
    #[command(name = "latent-gen", version, about = "Latent diffusion (Stable Diffusion family) on WebGPU")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
        /// Never use cooperative matrices (tensor cores), even where the GPU has them: every GEMM runs the
        /// portable kernels, as in a browser (to compare the two).
        #[arg(long, global = true)]
        no_coop: bool,
        /// Queries per invocation of the portable attention kernel (1, the default, or 2): a kernel variant
        /// whose speed depends on the GPU, for benchmarks to compare.
        #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        attention_queries: u32,
        /// The portable GEMM without register prefetch (reads each k step's tiles at its start): a kernel
        /// variant for benchmarks to compare.
        #[arg(long, global = true)]
        no_prefetch: bool,
        /// The portable GEMM with double-buffered workgroup tiles (one barrier per k step instead of two, twice
        /// the workgroup memory; tiles that do not fit the GPU's limit stay single): a kernel variant for
        /// benchmarks to compare.
        #[arg(long, global = true)]
        double_buffer: bool,
        /// Split the k loop of GEMMs that would run on fewer than N workgroups (0, the default: never), and
        /// sum the chunks in a second pass: a kernel variant for benchmarks to compare (for a GPU with C
        /// cores, try N = 2 C).
        #[arg(long, global = true, default_value_t = 0, value_name = "N")]
        split_k: u32,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Generate an image from a prompt.
        Generate(Generate),
        /// Walk latent space between two seeds and/or prompts: frames side by side in one PNG (and an
        /// animated GIF), the first and last equal to plain generations of the two ends.
        Interpolate(Interpolate),
        /// A labelled grid of images over one or two settings (e.g. --x guidance=3,5,7.5 --y seed=1,2,3),
        /// the model loaded once.
        Grid(Grid),
        /// Write a model (diffusers folder, single file or GGUF) as one GGUF file in stable-diffusion.cpp's
        /// layout and names, quantized, with our configs in its metadata (or as a single-file .safetensors).
        Convert(Convert),
        /// Print the GPU adapter, its limits and features.
        Info,
        /// Benchmarks.
        Bench {
            #[command(subcommand)]
            what: Bench,
        },
    }

    #[derive(Clone, Copy, ValueEnum)]
    enum Precision {
        F32,
        F16,
    }

    #[derive(Clone, Copy, ValueEnum)]
    enum Prediction {
        Epsilon,
        V,
    }

    impl Prediction {
        fn config_name(self) -> &'static str {
            match self {
                Prediction::Epsilon => "epsilon",
                Prediction::V => "v_prediction",
            }
        }
    }

    #[derive(Clone, Copy, ValueEnum)]
    enum WeightType {
        F32,
        F16,
        #[value(name = "q8_0")]
        Q8_0,
        #[value(name = "q4_0")]
        Q4_0,
    }

    #[derive(clap::Args)]
    struct Generate {
        /// A diffusers-layout model folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/,
        /// scheduler/) or a single-file checkpoint (.safetensors with the original SD 1.x / 2.x names).
        /// Defaults to the bundled tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// For a single-file model: a diffusers folder whose configs, tokenizer and scheduler to use instead
        /// of those read off the file (as diffusers' from_single_file(config=...)).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the scheduler's prediction type (SD 2.x single files default to v, for the 768 models).
        #[arg(long, value_enum)]
        prediction: Option<Prediction>,
        /// Required unless --batch gives the prompts.
        #[arg(long, required_unless_present = "batch")]
        prompt: Option<String>,
        #[arg(long, default_value = "")]
        negative: String,
        /// Read the prompts literally, as diffusers does, instead of in A1111's weighting syntax
        /// ("(word)" x1.1, "(word:1.5)", "[word]" /1.1, "\(" for a literal bracket).
        #[arg(long)]
        literal_prompt: bool,
        /// Prompts past the text encoder's 75 tokens: "truncate" (diffusers') or "chunks": encoded in
        /// 75-token chunks side by side (A1111's).
        #[arg(long, default_value = "truncate")]
        long_prompt: latent_gen::pipeline::LongPrompt,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// A variation: the initial noise is slerped toward this seed's (A1111's "variation seed").
        #[arg(long)]
        subseed: Option<u64>,
        /// How far toward --subseed's noise (0: the seed's image, 1: the subseed's).
        #[arg(long, default_value_t = 0.0, requires = "subseed")]
        subseed_strength: f32,
        /// img2img: start from this PNG (resized to the generation size; without --width/--height the size is
        /// the first image's, rounded down to what the model takes). Repeat with PATH:WEIGHT to blend several
        /// images' latents (style mixing), e.g. --init-image a.png:0.6 --init-image b.png:0.4.
        #[arg(long = "init-image", value_name = "PNG[:WEIGHT]")]
        init_images: Vec<String>,
        /// img2img's denoising strength, in (0, 1]: how much of the schedule runs from the noised init
        /// image (1 keeps little of it; 0.3 changes details).
        #[arg(long, default_value_t = 0.75)]
        strength: f32,
        /// ddim, euler, euler-a, dpm++2m, dpm++2m-karras or lcm; defaults to the model's scheduler config.
        #[arg(long)]
        scheduler: Option<SchedulerKind>,
        /// Defaults to the UNet's sample_size times the VAE's downsampling factor.
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// The PNG to write (required unless --batch).
        #[arg(long, required_unless_present = "batch")]
        out: Option<PathBuf>,
        /// Generate many images with the model loaded once: a file of JSON lines, each with "out" (the PNG)
        /// and any of "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height",
        /// "scheduler", "subseed", "subseed_strength", "strength"; fields left out take the command line's
        /// values (the init images are the command line's).
        #[arg(long, conflicts_with = "dump_latents")]
        batch: Option<PathBuf>,
        /// Also save the initial noise ("init"), every step's latent ("step_0"...) and the final latent
        /// ("final") as f32 tensors.
        #[arg(long)]
        dump_latents: Option<PathBuf>,
        /// Activations in f16 (needs shader-f16).
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
        /// How linear and conv weights are stored on the GPU (quantized on load).
        #[arg(long, value_enum, default_value = "f32")]
        weights: WeightType,
        /// Run on the CPU (candle) instead of the GPU; also the fallback when no GPU adapter is found.
        #[arg(long)]
        cpu: bool,
        /// A LoRA to merge into the weights (.safetensors, kohya/A1111 or diffusers/PEFT), at SCALE (default
        /// 1); repeat for several. The PNG's prompt records each as A1111's <lora:NAME:SCALE> tag.
        #[arg(long = "lora", value_name = "FILE[:SCALE]")]
        loras: Vec<String>,
        /// A textual-inversion embedding (A1111 .safetensors or .pt, diffusers' learned_embeds); repeat for
        /// several. Its trigger word (A1111: the file name; diffusers: the token in the file) in a prompt
        /// stands for its vectors.
        #[arg(long = "embedding", value_name = "FILE")]
        embeddings: Vec<PathBuf>,
    }

    #[derive(clap::Args)]
    struct Interpolate {
        #[command(flatten)]
        from: Generate,
        /// The far end's seed (default: --seed).
        #[arg(long)]
        to_seed: Option<u64>,
        /// The far end's prompt (default: --prompt).
        #[arg(long)]
        to_prompt: Option<String>,
        /// The far end's negative prompt (default: --negative).
        #[arg(long)]
        to_negative: Option<String>,
        /// Frames, the two ends included.
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// Also write the frames as an animated GIF (there and back, looping).
        #[arg(long)]
        animation: Option<PathBuf>,
        /// Milliseconds per frame of the animation.
        #[arg(long, default_value_t = 150)]
        frame_ms: u16,
    }

    #[derive(clap::Args)]
    struct Grid {
        #[command(flatten)]
        base: Generate,
        /// The columns: KEY=V1,V2,... with KEY one of seed, guidance, steps, scheduler, strength,
        /// subseed-strength, or prompt (search and replace: the first value is a word of --prompt, each
        /// value replaces it).
        #[arg(long)]
        x: String,
        /// The rows, as --x.
        #[arg(long)]
        y: Option<String>,
    }

    #[derive(clap::Args)]
    struct Convert {
        /// A diffusers folder, a single-file .safetensors checkpoint or a .gguf.
        #[arg(long)]
        model: PathBuf,
        /// For a single-file model: a diffusers folder with its configs, tokenizer and scheduler.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Linear weights (matrices whose rows are multiples of 32) in q8_0 or q4_0; other matrices are f16,
        /// vectors f32. f16 writes every matrix in f16.
        #[arg(long, value_enum)]
        weights: WeightType,
        /// Also quantize 3x3 and 1x1 convolutions, as (out, in * kh * kw) matrices: about half the size of
        /// a q4_0 SD 1.5, read by latent-gen but not by stable-diffusion.cpp (which keeps them f16).
        #[arg(long)]
        quantize_convs: bool,
        /// The .gguf (or single-file .safetensors, f16) to write; written as FILE.partial first, renamed when
        /// complete.
        #[arg(long)]
        out: PathBuf,
    }

    #[derive(Subcommand)]
    enum Bench {
        /// Time each kernel at Stable Diffusion 1.5's shapes (512x512, CFG batch 2).
        Kernels {
            /// Smaller shapes: about a minute on a CPU Vulkan driver (lavapipe).
            #[arg(long)]
            quick: bool,
            /// Also write the records as JSON to this file.
            #[arg(long)]
            json: Option<PathBuf>,
            /// Only cases whose kernel or shape contains this text (or one of its comma-separated parts).
            #[arg(long)]
            only: Option<String>,
        },
        /// Time CLIP, a UNet CFG step, VAE and TAESD decode of a real architecture (random weights, no
        /// download) at 512x512, and the peak GPU memory.
        Pipeline {
            /// sd15 or sd-turbo.
            #[arg(long, default_value = "sd15")]
            arch: latent_gen::bench::Arch,
            /// 128x128 and one timed run instead of 512x512 and three: minutes, not hours, on lavapipe.
            #[arg(long)]
            quick: bool,
            /// Count instead of timing: build the models, then check, allocate and count every kernel
            /// without dispatching any (peak GPU memory, dispatches, bytes, FLOPs), in seconds on any machine.
            #[arg(long)]
            count_only: bool,
            #[arg(long, value_enum, default_value = "f32")]
            precision: Precision,
            #[arg(long, value_enum, default_value = "f32")]
            weights: WeightType,
            /// Timed runs of each part after its warm-up (default 3; 1 with --quick). One is enough for the
            /// peak GPU memory.
            #[arg(long)]
            repeat: Option<usize>,
            #[arg(long)]
            json: Option<PathBuf>,
        },
        /// Time the UNet alone (CFG batch 2), as the diagnostics page's benchmark does: random weights made
        /// on the spot (q4_0 blocks directly with --weights q4_0), optionally narrowed.
        Unet {
            #[arg(long, default_value = "sd15")]
            arch: latent_gen::bench::Arch,
            /// Divide every width by this (1: the real model).
            #[arg(long, default_value_t = 1)]
            narrow: usize,
            /// Image side in pixels.
            #[arg(long, default_value_t = 512)]
            size: usize,
            #[arg(long, value_enum, default_value = "f32")]
            precision: Precision,
            #[arg(long, value_enum, default_value = "q4_0")]
            weights: WeightType,
            #[arg(long, default_value_t = 3)]
            repeat: usize,
            #[arg(long)]
            json: Option<PathBuf>,
            /// Run on the CPU fallback (candle) instead of the GPU.
            #[arg(long)]
            cpu: bool,
            /// The UNet's weights from this diffusers safetensors file (e.g. the unet/ of `bench
            /// write-model`'s folder) instead of random ones made on the spot.
            #[arg(long)]
            weights_file: Option<PathBuf>,
            /// Write the step's inputs and output (f32 tensors sample, context, timestep, out) to this
            /// safetensors file, to run another implementation on the same inputs (scripts/bench-cpu).
            #[arg(long)]
            dump: Option<PathBuf>,
        },
        /// Write a real-size model with random weights (sd15 or sd-turbo) as an f16 diffusers folder: for
        /// loading tests at real size without a download.
        WriteModel {
            #[arg(long, default_value = "sd15")]
            arch: latent_gen::bench::Arch,
            #[arg(long)]
            out: PathBuf,
        },
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        match pollster::block_on(run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
        let tuning = Tuning {
            attention_queries: cli.attention_queries,
            gemm_prefetch: !cli.no_prefetch,
            gemm_double_buffer: cli.double_buffer,
            split_k_below: cli.split_k,
        };
        let options = ContextOptions { coop: !cli.no_coop, tuning, ..Default::default() };
        let gpu_or_cpu = || gpu_or_cpu(options);
        match cli.command {
            Command::Generate(g) => {
                let ctx = if g.cpu { GpuContext::cpu() } else { gpu_or_cpu().await? };
                generate(&ctx, g).await
            }
            Command::Interpolate(i) => {
                let ctx = if i.from.cpu { GpuContext::cpu() } else { gpu_or_cpu().await? };
                interpolate(&ctx, i).await
            }
            Command::Grid(g) => {
                let ctx = if g.base.cpu { GpuContext::cpu() } else { gpu_or_cpu().await? };
                grid(&ctx, g).await
            }
            Command::Convert(c) => convert(c),
            Command::Info => {
                println!("{}", GpuContext::with_options(options).await?.summary());
                Ok(())
            }
            Command::Bench { what: what @ Bench::WriteModel { .. } } => bench(&GpuContext::cpu(), what).await,
            Command::Bench { what: what @ Bench::Unet { cpu: true, .. } } => bench(&GpuContext::cpu(), what).await,
            Command::Bench { what } => bench(&GpuContext::with_options(options).await?, what).await,
        }
    }

    /// The GPU, or the CPU fallback with a warning when there is no adapter.
    async fn gpu_or_cpu(options: ContextOptions) -> Result<GpuContext, Box<dyn std::error::Error>> {
        match GpuContext::with_options(options).await {
            Ok(ctx) => Ok(ctx),
            Err(e @ latent_gen::Error::NoAdapter(_)) => {
                eprintln!("warning: {e}\nfalling back to the CPU (much slower)");
                Ok(GpuContext::cpu())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn bench(ctx: &GpuContext, what: Bench) -> Result<(), Box<dyn std::error::Error>> {
        match what {
            Bench::WriteModel { arch, out } => {
                let start = Instant::now();
                let bytes = latent_gen::bench::write_random_model(arch, &out, |m| eprintln!("{m}"))?;
                println!(
                    "wrote {} ({:.2} GB of weights) in {:.1} s",
                    out.display(),
                    bytes as f64 / 1e9,
                    start.elapsed().as_secs_f64()
                );
            }
            Bench::Kernels { quick, json, only } => {
                let s = ctx.summary();
                println!("adapter: {} ({}, {})", s.name, s.backend, s.device_type);
                println!(
                    "{:<14} {:<44} {:<4} {:<5} {:<19} {:>13} {:>15}",
                    "kernel", "shape", "act", "wt", "tile", "time", "rate"
                );
                let records =
                    latent_gen::bench::bench_kernels(ctx, quick, only.as_deref(), |r| println!("{r}")).await?;
                if let Some(path) = json {
                    write_json(&path, &records)?;
                    println!("wrote {} records to {}", records.len(), path.display());
                }
            }
            Bench::Unet { arch, narrow, size, precision, weights, repeat, json, cpu: _, weights_file, dump } => {
                let policy = LoadPolicy { act: act_dtype(ctx, precision)?, weights: weight_dtype(weights) };
                let file = weights_file.as_deref().map(latent_gen::weights::Safetensors::open).transpose()?;
                let src = file.as_ref().map(|f| f as &dyn latent_gen::weights::TensorSource);
                let (r, io) =
                    latent_gen::bench::bench_unet_with(ctx, arch, narrow, size, policy, repeat.max(1), src, |m| {
                        eprintln!("{m}")
                    })
                    .await?;
                if let Some(path) = dump {
                    write_unet_io(&path, &io)?;
                    println!("wrote {}", path.display());
                }
                println!(
                    "{:?} UNet (widths / {}) at {}x{}, {} activations, {} weights, on {} ({}): {:.2} ms per CFG \
                     step, {} dispatches, loaded in {:.2} s, peak GPU memory {:.1} MiB",
                    r.arch,
                    r.narrow,
                    r.width,
                    r.height,
                    r.act,
                    r.weights,
                    r.adapter,
                    r.backend,
                    r.unet_cfg_step_ms,
                    r.unet_step_dispatches,
                    r.load_s,
                    r.peak_gpu_bytes as f64 / (1 << 20) as f64
                );
                if !r.cpu_op_ms.is_empty() {
                    let total: f64 = r.cpu_op_ms.iter().map(|f| f.1).sum();
                    println!("one step by op family ({} threads):", r.cpu_threads);
                    for (family, ms) in &r.cpu_op_ms {
                        println!("  {family:<12} {ms:>9.1} ms  {:>5.1}%", 100.0 * ms / total);
                    }
                }
                if let Some(path) = json {
                    write_json(&path, &r)?;
                    println!("wrote {}", path.display());
                }
            }
            Bench::Pipeline { arch, quick, count_only, precision, weights, repeat, json } => {
                let policy = LoadPolicy { act: act_dtype(ctx, precision)?, weights: weight_dtype(weights) };
                let (size, default_repeat) = if quick { (128, 1) } else { (512, 3) };
                if count_only {
                    let r = latent_gen::bench::count_pipeline(ctx, arch, size, policy, |m| eprintln!("{m}")).await?;
                    println!("{r}");
                    if let Some(path) = json {
                        write_json(&path, &r)?;
                        println!("wrote {}", path.display());
                    }
                    return Ok(());
                }
                let repeat = repeat.unwrap_or(default_repeat).max(1);
                let r =
                    latent_gen::bench::bench_pipeline(ctx, arch, size, policy, repeat, |m| eprintln!("{m}")).await?;
                println!("{r}");
                if let Some(path) = json {
                    write_json(&path, &r)?;
                    println!("wrote {}", path.display());
                }
            }
        }
        Ok(())
    }

    fn act_dtype(ctx: &GpuContext, p: Precision) -> Result<DType, Box<dyn std::error::Error>> {
        match p {
            Precision::F32 => Ok(DType::F32),
            Precision::F16 if ctx.has_f16() || ctx.is_cpu() => Ok(DType::F16),
            Precision::F16 => Err("--precision f16 needs shader-f16, which this adapter lacks".into()),
        }
    }

    fn convert(c: Convert) -> Result<(), Box<dyn std::error::Error>> {
        let format = latent_gen::convert::Format::from_path(&c.out)?;
        let src = latent_gen::pipeline::open_model(&c.model, c.config.as_deref())?;
        let mut partial = c.out.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        if let Some(parent) = c.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let file = std::fs::File::create(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let start = Instant::now();
        let mut last = Instant::now();
        let mut progress = |done: usize, total: usize| {
            if last.elapsed().as_millis() > 500 || done == total {
                eprint!("\rconverting: {done}/{total} tensors");
                last = Instant::now();
            }
        };
        let result = latent_gen::convert::convert(
            src.as_ref(),
            format,
            weight_dtype(c.weights),
            c.quantize_convs,
            &mut out,
            &mut progress,
        )
        .and_then(|r| {
            use std::io::Write;
            out.flush().map_err(|e| latent_gen::Error::Invalid(format!("writing {}: {e}", partial.display())))?;
            Ok(r)
        });
        eprintln!();
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                drop(out);
                let _ = std::fs::remove_file(&partial);
                return Err(e.into());
            }
        };
        std::fs::rename(&partial, &c.out).map_err(|e| format!("renaming to {}: {e}", c.out.display()))?;
        let kinds: Vec<String> = report.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
        println!(
            "wrote {} ({} tensors: {}; {:.1} MB) in {:.1} s",
            c.out.display(),
            report.tensors,
            kinds.join(", "),
            report.bytes as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
        if !report.skipped.is_empty() {
            println!("left out (not weights): {}", report.skipped.join(", "));
        }
        Ok(())
    }

    fn weight_dtype(w: WeightType) -> DType {
        match w {
            WeightType::F32 => DType::F32,
            WeightType::F16 => DType::F16,
            WeightType::Q8_0 => DType::Q8_0,
            WeightType::Q4_0 => DType::Q4_0,
        }
    }

    /// A UNet step's inputs and output as f32 safetensors (sample, context, timestep, out).
    fn write_unet_io(path: &Path, io: &latent_gen::bench::UnetIo) -> Result<(), Box<dyn std::error::Error>> {
        let t = [io.timestep];
        let parts = [
            ("sample", &io.sample.0[..], &io.sample.1[..]),
            ("context", &io.context.0[..], &io.context.1[..]),
            ("timestep", &[1][..], &t[..]),
            ("out", &io.out.0[..], &io.out.1[..]),
        ];
        let views = parts
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.to_vec(),
                    bytemuck::cast_slice(data),
                )?;
                Ok((name.to_string(), view))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        safetensors::serialize_to_file(views, None, path)?;
        Ok(())
    }

    fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), Box<dyn std::error::Error>> {
        std::fs::write(path, serde_json::to_string_pretty(v)?)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(())
    }

    /// A loaded model, its name for the PNG parameters, the command line's request and init images.
    struct Loaded {
        sd: StableDiffusion,
        model_name: String,
        base: Request,
        init: Vec<(Image, f32)>,
    }

    async fn generate(ctx: &GpuContext, g: Generate) -> Result<(), Box<dyn std::error::Error>> {
        let Loaded { sd, model_name, base, init } = load(ctx, &g)?;
        let Some(batch) = &g.batch else {
            let out = g.out.clone().ok_or("--out is required")?;
            return generate_one(ctx, &sd, &model_name, &base, &init, &out, g.dump_latents.as_deref()).await;
        };
        let text = std::fs::read_to_string(batch).map_err(|e| format!("reading {}: {e}", batch.display()))?;
        let jobs = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let mut count = 0usize;
        for (n, line) in jobs {
            let bad = |e: String| format!("{}:{}: {e}", batch.display(), n + 1);
            let mut fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
            let out = match fields.remove("out") {
                Some(serde_json::Value::String(out)) => PathBuf::from(out),
                _ => return Err(bad("needs \"out\": the PNG's path".into()).into()),
            };
            let mut merged = match serde_json::to_value(&base)? {
                serde_json::Value::Object(m) => m,
                _ => unreachable!("a Request serializes to an object"),
            };
            merged.extend(fields);
            let req: Request =
                serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| bad(e.to_string()))?;
            generate_one(ctx, &sd, &model_name, &req, &init, &out, None).await.map_err(|e| bad(e.to_string()))?;
            count += 1;
        }
        let pool = ctx.pool_stats();
        eprintln!(
            "{count} images; GPU buffers: {} created, {:.1} MB at the peak; bind groups: {} created; {}",
            pool.created,
            pool.peak_bytes as f64 / 1e6,
            ctx.bind_groups_created(),
            peak_memory().map(|mb| format!("peak memory (RSS) {mb:.1} MB")).unwrap_or_default()
        );
        Ok(())
    }

    async fn interpolate(ctx: &GpuContext, i: Interpolate) -> Result<(), Box<dyn std::error::Error>> {
        if i.from.batch.is_some() || !i.from.init_images.is_empty() || i.from.dump_latents.is_some() {
            return Err("interpolate takes neither --batch, --init-image nor --dump-latents".into());
        }
        if !(2..=256).contains(&i.frames) {
            return Err(format!("--frames must be between 2 and 256, got {}", i.frames).into());
        }
        if i.to_seed.is_none() && i.to_prompt.is_none() && i.to_negative.is_none() {
            return Err("interpolate needs a far end: --to-seed, --to-prompt and/or --to-negative".into());
        }
        let out = i.from.out.clone().ok_or("--out (the strip PNG) is required")?;
        let Loaded { sd, model_name, base: a, .. } = load(ctx, &i.from)?;
        let b = Request {
            seed: i.to_seed.unwrap_or(a.seed),
            prompt: i.to_prompt.clone().unwrap_or_else(|| a.prompt.clone()),
            negative_prompt: i.to_negative.clone().unwrap_or_else(|| a.negative_prompt.clone()),
            ..a.clone()
        };
        let (w, h) = sd.size(&a)?;
        let kind = sd.scheduler_kind(&a)?;
        let mut frames = Vec::with_capacity(i.frames);
        let start = Instant::now();
        for f in 0..i.frames {
            let t = f as f32 / (i.frames - 1) as f32;
            let mut run = sd.start_between(&a, &b, t)?;
            while run.step().await?.is_some() {}
            frames.push(sd.decode(run.latents()).await?);
            eprintln!("frame {}/{} (t={t:.3}) at {:.1} s", f + 1, i.frames, start.elapsed().as_secs_f64());
        }
        let strip = compose::strip(&frames)?;
        let mut parameters = latent_gen::pipeline::parameters_text(&a, kind.name(), w, h, &model_name);
        parameters.push_str(&format!(
            "\nInterpolation: {} frames to seed {}, prompt: {}, negative prompt: {}",
            i.frames, b.seed, b.prompt, b.negative_prompt
        ));
        std::fs::write(&out, strip.to_png(&parameters)?).map_err(|e| format!("writing {}: {e}", out.display()))?;
        eprintln!("wrote {} ({} frames of {w}x{h})", out.display(), frames.len());
        if let Some(path) = &i.animation {
            std::fs::write(path, compose::gif(&frames, i.frame_ms)?)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }

    async fn grid(ctx: &GpuContext, g: Grid) -> Result<(), Box<dyn std::error::Error>> {
        if g.base.batch.is_some() || g.base.dump_latents.is_some() {
            return Err("grid takes neither --batch nor --dump-latents".into());
        }
        let out = g.base.out.clone().ok_or("--out (the grid PNG) is required")?;
        let x = Axis::parse(&g.x)?;
        let y = g.y.as_deref().map(Axis::parse).transpose()?;
        let Loaded { sd, model_name, base, init } = load(ctx, &g.base)?;
        let (w, h) = sd.size(&base)?;
        let cells = compose::grid_requests(&base, &x, y.as_ref())?;
        let init: Vec<InitImage> =
            init.iter().map(|(image, weight)| InitImage { image: image.resized(w, h), weight: *weight }).collect();
        let start = Instant::now();
        let mut images = Vec::with_capacity(cells.len());
        for (n, req) in cells.iter().enumerate() {
            let mut go = |_: &latent_gen::pipeline::Step<'_>| Ok(Control::Continue);
            images.push(sd.generate_from(req, &init, &mut go).await?);
            eprintln!("cell {}/{} at {:.1} s", n + 1, cells.len(), start.elapsed().as_secs_f64());
        }
        let grid = compose::grid_image(&images, &x, y.as_ref())?;
        let rows = y.as_ref().map_or(1, |a| a.values.len());
        let kind = sd.scheduler_kind(&base)?;
        let mut parameters =
            latent_gen::pipeline::parameters_text_from(&base, kind.name(), w, h, &model_name, !init.is_empty());
        parameters.push_str(&format!("\nGrid: x {}", x.describe()));
        if let Some(a) = &y {
            parameters.push_str(&format!("; y {}", a.describe()));
        }
        std::fs::write(&out, grid.to_png(&parameters)?).map_err(|e| format!("writing {}: {e}", out.display()))?;
        eprintln!("wrote {} ({} x {} cells of {w}x{h})", out.display(), x.values.len(), rows);
        Ok(())
    }

    fn load(ctx: &GpuContext, g: &Generate) -> Result<Loaded, Box<dyn std::error::Error>> {
        let model = g.model.clone().unwrap_or_else(|| PathBuf::from(BUNDLED_MODEL));
        let (act, weights) = (act_dtype(ctx, g.precision)?, weight_dtype(g.weights));
        let start = Instant::now();
        eprintln!("loading {}", model.display());
        let init = read_init_images(&g.init_images)?;
        let loras = read_loras(&g.loras)?;
        let embeddings = g.embeddings.iter().map(|p| Embedding::open(p)).collect::<Result<Vec<_>, _>>()?;
        let src = latent_gen::pipeline::open_model(&model, g.config.as_deref())?;
        let lora_refs: Vec<(&Lora, f32)> = loras.iter().map(|(l, s)| (l, *s)).collect();
        let embedding_refs: Vec<&Embedding> = embeddings.iter().collect();
        let adapters = Adapters { loras: &lora_refs, embeddings: &embedding_refs };
        let mut sd = StableDiffusion::load_with(ctx, src.as_ref(), LoadPolicy { act, weights }, adapters)?;
        for warning in &sd.adapter_warnings {
            eprintln!("warning: {warning}");
        }
        for (lora, scale) in &loras {
            eprintln!("LoRA {} at {scale}: {} layers ({:?} format)", lora.name, lora.layers.len(), lora.format);
        }
        for e in &embeddings {
            eprintln!("embedding {:?}: {} vectors", e.trigger, e.vectors());
        }
        if !init.is_empty() {
            sd.load_vae_encoder(src.as_ref(), LoadPolicy { act, weights })?;
        }
        drop(src);
        if let Some(p) = g.prediction {
            sd.scheduler_config.prediction_type = Some(p.config_name().into());
        }
        eprintln!("loaded in {:.2} s on {}", start.elapsed().as_secs_f64(), ctx.summary().name);
        // LoRAs come from --lora; tags in the prompt are taken out, and the PNG's prompt names the loaded ones
        // as A1111 writes them.
        let (mut prompt, tags) = latent_gen::prompt::lora_tags(g.prompt.as_deref().unwrap_or_default());
        if !tags.is_empty() && !g.literal_prompt {
            eprintln!(
                "warning: the CLI applies LoRAs given with --lora FILE[:SCALE]; the prompt's <lora:...> tags are ignored"
            );
        }
        if g.literal_prompt {
            prompt = g.prompt.clone().unwrap_or_default();
        } else {
            for (lora, scale) in &loras {
                prompt.push_str(&format!(" <lora:{}:{scale}>", lora.name));
            }
        }
        let base = Request {
            prompt,
            negative_prompt: g.negative.clone(),
            seed: g.seed,
            steps: g.steps,
            guidance: g.guidance,
            width: g.width,
            height: g.height,
            scheduler: g.scheduler,
            subseed: g.subseed,
            subseed_strength: g.subseed_strength,
            strength: g.strength,
            literal_prompt: g.literal_prompt,
            long_prompt: g.long_prompt,
        };
        // Without a size, img2img takes the first init image's, rounded down to what the model takes.
        let mut base = base;
        if let Some((first, _)) = init.first() {
            let m = sd.size_multiple();
            let own = |v: usize| (v / m * m).max(m);
            base.width = base.width.or(Some(own(first.width)));
            base.height = base.height.or(Some(own(first.height)));
        }
        let base = base;
        // A folder's name, or a checkpoint file's without its extension.
        let name = if model.is_file() { model.file_stem() } else { model.file_name() };
        let model_name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Loaded { sd, model_name, base, init })
    }

    /// The process's peak resident memory in MB (Linux: VmHWM), for batch reports.
    fn peak_memory() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }

    /// The --lora values: each file parsed, with its scale (1 when none is given).
    fn read_loras(args: &[String]) -> Result<Vec<(Lora, f32)>, Box<dyn std::error::Error>> {
        args.iter()
            .map(|a| {
                let (path, scale) = match a.rsplit_once(':') {
                    Some((p, s)) if !p.is_empty() && s.parse::<f32>().is_ok() => (p, s.parse::<f32>()?),
                    _ => (a.as_str(), 1.0),
                };
                if !scale.is_finite() {
                    return Err(format!("--lora {a}: the scale must be a number").into());
                }
                Ok((Lora::open(Path::new(path))?, scale))
            })
            .collect()
    }

    /// The --init-image values: each PNG read, with its weight (1 when none is given).
    fn read_init_images(args: &[String]) -> Result<Vec<(Image, f32)>, Box<dyn std::error::Error>> {
        args.iter()
            .map(|a| {
                let (path, weight) = match a.rsplit_once(':') {
                    Some((p, w)) if !p.is_empty() && w.parse::<f32>().is_ok() => (p, w.parse::<f32>()?),
                    _ => (a.as_str(), 1.0),
                };
                let bytes = std::fs::read(path).map_err(|e| format!("reading the init image {path}: {e}"))?;
                let image = Image::from_png(&bytes).map_err(|e| format!("the init image {path}: {e}"))?;
                Ok((image, weight))
            })
            .collect()
    }

    /// One image: progress on stderr, the PNG with its parameters, optionally the latents.
    #[allow(clippy::too_many_arguments)]
    async fn generate_one(
        ctx: &GpuContext,
        sd: &StableDiffusion,
        model_name: &str,
        req: &Request,
        init: &[(Image, f32)],
        out: &Path,
        dump_latents: Option<&Path>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (w, h) = sd.size(req)?;
        let init: Vec<InitImage> =
            init.iter().map(|(image, weight)| InitImage { image: image.resized(w, h), weight: *weight }).collect();
        let kind = sd.scheduler_kind(req)?;
        let truncated = req.long_prompt == latent_gen::pipeline::LongPrompt::Truncate;
        let prompts = [("prompt", &req.prompt), ("negative prompt", &req.negative_prompt)];
        for (which, text) in prompts.into_iter().filter(|_| truncated) {
            if let Some(words) = sd.tokenizer.cut_off(text, !req.literal_prompt)? {
                eprintln!(
                    "warning: the {which} is longer than the text encoder's 75 tokens; cut off: \"{words}\" \
                     (--long-prompt chunks keeps it all)"
                );
            }
        }
        let mut dump: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        if dump_latents.is_some() {
            let (shape, noise) = sd.initial_noise(req)?;
            dump.push(("init".into(), shape, noise));
        }
        let loop_start = Instant::now();
        let mut last = Instant::now();
        let mut ran = 0usize;
        let mut on_step = |s: &latent_gen::pipeline::Step<'_>| {
            ran = s.steps;
            let now = Instant::now();
            eprintln!(
                "step {}/{} (t={}) {:.3} s",
                s.index + 1,
                s.steps,
                s.timestep,
                now.duration_since(last).as_secs_f64()
            );
            last = now;
            if dump_latents.is_some() {
                let data = pollster::block_on(s.latents.to_vec_f32(ctx))?;
                dump.push((format!("step_{}", s.index), s.latents.shape().to_vec(), data));
            }
            Ok(Control::Continue)
        };
        let latents = sd.denoise_from(req, &init, &mut on_step).await?;
        let steps_time = loop_start.elapsed().as_secs_f64();
        let image = sd.decode(&latents).await?;
        eprintln!(
            "{ran} steps in {steps_time:.2} s ({:.2} it/s), total {:.2} s",
            ran as f64 / steps_time,
            loop_start.elapsed().as_secs_f64()
        );
        if let Some(path) = dump_latents {
            dump.push(("final".into(), latents.shape().to_vec(), latents.to_vec_f32(ctx).await?));
            write_safetensors(path, &dump)?;
            eprintln!("wrote {} latents to {}", dump.len(), path.display());
        }
        let parameters =
            latent_gen::pipeline::parameters_text_from(req, kind.name(), w, h, model_name, !init.is_empty());
        std::fs::write(out, image.to_png(&parameters)?).map_err(|e| format!("writing {}: {e}", out.display()))?;
        eprintln!("wrote {}", out.display());
        Ok(())
    }

    fn write_safetensors(
        path: &Path,
        tensors: &[(String, Vec<usize>, Vec<f32>)],
    ) -> Result<(), Box<dyn std::error::Error>> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(data),
                )?;
                Ok((name.clone(), view))
            })
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        safetensors::serialize_to_file(views, None, path)?;
        Ok(())
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
