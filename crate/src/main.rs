//! The `latent-gen` command line: adapter info and benchmarks (generation comes with the pipeline).

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::path::PathBuf;
    use std::process::ExitCode;

    use clap::{Parser, Subcommand};
    use latent_gen::gpu::GpuContext;

    #[derive(Parser)]
    #[command(name = "latent-gen", version, about = "Latent diffusion on WebGPU")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Print the GPU adapter, its limits and features.
        Info,
        /// Benchmarks.
        Bench {
            #[command(subcommand)]
            what: Bench,
        },
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
            /// Only cases whose kernel or shape contains this text.
            #[arg(long)]
            only: Option<String>,
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
        let ctx = GpuContext::new().await?;
        match cli.command {
            Command::Info => println!("{}", ctx.summary()),
            Command::Bench { what: Bench::Kernels { quick, json, only } } => {
                let s = ctx.summary();
                println!("adapter: {} ({}, {})", s.name, s.backend, s.device_type);
                println!("{:<14} {:<44} {:<4} {:<5} {:>13} {:>15}", "kernel", "shape", "act", "wt", "time", "rate");
                let records =
                    latent_gen::bench::bench_kernels(&ctx, quick, only.as_deref(), |r| println!("{r}")).await?;
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&records)?)
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                    println!("wrote {} records to {}", records.len(), path.display());
                }
            }
        }
        Ok(())
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
