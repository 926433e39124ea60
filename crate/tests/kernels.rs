//! Every kernel against candle's CPU result: natively on the first adapter wgpu finds (lavapipe in CI) and in
//! headless Chromium (WebGPU on SwiftShader) through wasm-bindgen-test. Both run the bodies in
//! `latent_gen::selfcheck`. With no adapter the tests fail: they never skip.

use latent_gen::gpu::GpuContext;
use latent_gen::selfcheck;

#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

#[cfg(not(target_arch = "wasm32"))]
fn context() -> GpuContext {
    static CTX: std::sync::OnceLock<GpuContext> = std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        let ctx =
            pollster::block_on(GpuContext::new()).unwrap_or_else(|e| panic!("kernel tests need a GPU adapter: {e}"));
        eprintln!("{}", ctx.summary());
        // scripts/test runs the GEMM checks a second time on a lavapipe with cooperative matrices: there
        // they must take that path (selfcheck adds the coop tile to every f16 GEMM case when the device has it).
        if std::env::var_os("LATENT_GEN_EXPECT_COOP").is_some() {
            assert!(
                ctx.coop().is_some(),
                "LATENT_GEN_EXPECT_COOP is set but the adapter has no usable cooperative matrices"
            );
        }
        ctx
    })
    .clone()
}

async fn check(ctx: &GpuContext, name: &str) {
    let reports = selfcheck::run(ctx, name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!reports.is_empty(), "{name} checked nothing");
    for r in &reports {
        println!("{r}");
    }
    // The failures again in the panic message: in the browser, wasm-bindgen-test shows only that.
    let failed: Vec<String> = reports.iter().filter(|r| !r.passed).map(|r| r.to_string()).collect();
    assert!(failed.is_empty(), "{name}: {} of {} cases failed:\n{}", failed.len(), reports.len(), failed.join("\n"));
}

macro_rules! kernel_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(not(target_arch = "wasm32"))]
            #[test]
            fn $name() {
                pollster::block_on(check(&context(), stringify!($name)));
            }

            #[cfg(target_arch = "wasm32")]
            #[wasm_bindgen_test::wasm_bindgen_test]
            async fn $name() {
                let ctx = GpuContext::new().await.unwrap_or_else(|e| panic!("kernel tests need WebGPU: {e}"));
                check(&ctx, stringify!($name)).await;
            }
        )*

        #[test]
        #[cfg(not(target_arch = "wasm32"))]
        fn every_check_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for name in selfcheck::CHECKS {
                assert!(tested.contains(name), "selfcheck {name} has no test");
            }
        }
    };
}

kernel_tests!(
    elementwise,
    activations,
    matmul,
    matmul_weights,
    conv2d,
    fusions,
    group_norm,
    layer_norm,
    softmax,
    attention,
    layout,
    timestep_embedding,
    finite,
    pack,
    errors,
);

/// The f32 paths, as on a device without shader-f16 (most browsers on Linux, SwiftShader): f16 is refused
/// with an error naming the missing feature, and f32 kernels still pass.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn without_shader_f16() {
    use latent_gen::gpu::ContextOptions;
    let ctx = pollster::block_on(GpuContext::with_options(ContextOptions { f16: false, ..Default::default() }))
        .expect("adapter");
    assert!(!ctx.has_f16());
    pollster::block_on(check(&ctx, "errors"));
    pollster::block_on(check(&ctx, "matmul"));
}

/// The portable kernels where the device has cooperative matrices (the default context takes those for f16):
/// f16 attention and GEMMs as a browser runs them. Where the device has none this repeats the default tests.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn without_cooperative_matrices() {
    use latent_gen::gpu::ContextOptions;
    let ctx = pollster::block_on(GpuContext::with_options(ContextOptions { coop: false, ..Default::default() }))
        .expect("adapter");
    assert!(ctx.coop().is_none());
    pollster::block_on(check(&ctx, "attention"));
    pollster::block_on(check(&ctx, "fusions"));
}

/// The kernel variants benchmarks compare (`latent-gen --attention-queries 2 --double-buffer --split-k N`):
/// two queries per invocation of the portable attention kernel, the GEMM with double-buffered tiles, split-K
/// chosen for every GEMM with k long enough (k >= 256: 16 tile steps); all portable (no cooperative
/// matrices), checked like the defaults: natively also the fused GEMMs, in the browser (where they cost about a
/// minute) attention and matmul, enough for Tint to compile and run each variant.
async fn kernel_variants_on(ctx: &GpuContext, checks: &[&str]) {
    assert_eq!(ctx.summary().tuning, variant_options().tuning);
    for name in checks {
        check(ctx, name).await;
    }
}

fn variant_options() -> latent_gen::gpu::ContextOptions {
    use latent_gen::gpu::{ContextOptions, Tuning};
    let tuning = Tuning { attention_queries: 2, gemm_prefetch: true, gemm_double_buffer: true, split_k_below: 1 << 20 };
    ContextOptions { coop: false, tuning, ..Default::default() }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn kernel_variants() {
    let ctx = pollster::block_on(GpuContext::with_options(variant_options())).expect("adapter");
    pollster::block_on(kernel_variants_on(&ctx, &["attention", "matmul", "fusions"]));
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn kernel_variants() {
    let ctx =
        GpuContext::with_options(variant_options()).await.unwrap_or_else(|e| panic!("kernel tests need WebGPU: {e}"));
    kernel_variants_on(&ctx, &["attention", "matmul"]).await;
}

/// The portable GEMM as it was before register prefetch (`latent-gen --no-prefetch`).
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn without_prefetch() {
    use latent_gen::gpu::{ContextOptions, Tuning};
    let tuning = Tuning { gemm_prefetch: false, ..Default::default() };
    let options = ContextOptions { coop: false, tuning, ..Default::default() };
    let ctx = pollster::block_on(GpuContext::with_options(options)).expect("adapter");
    assert_eq!(ctx.summary().tuning, tuning);
    pollster::block_on(check(&ctx, "matmul"));
}
