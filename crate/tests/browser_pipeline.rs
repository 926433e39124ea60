//! A whole tiny Stable Diffusion pipeline in the browser (wasm-bindgen-test in headless Chromium, WebGPU on
//! SwiftShader, f32 path): the fixture model and request give diffusers' image within PSNR 40 dB.
#![cfg(target_arch = "wasm32")]

use latent_gen::gpu::GpuContext;
use latent_gen::pipeline::{Control, MemorySource, Request, StableDiffusion};
use latent_gen::weights::LoadPolicy;
use wasm_bindgen_test::wasm_bindgen_test;

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

macro_rules! model_file {
    ($src:ident, $path:literal) => {
        $src.insert($path, include_bytes!(concat!("../../tests/fixtures/models/sd1-tiny/", $path)).to_vec());
    };
}

#[wasm_bindgen_test]
async fn tiny_pipeline_matches_diffusers_in_the_browser() {
    let ctx = GpuContext::new().await.unwrap_or_else(|e| panic!("the browser test needs WebGPU: {e}"));
    let mut src = MemorySource::new();
    model_file!(src, "model_index.json");
    model_file!(src, "text_encoder/config.json");
    model_file!(src, "text_encoder/model.safetensors");
    model_file!(src, "tokenizer/vocab.json");
    model_file!(src, "tokenizer/merges.txt");
    model_file!(src, "tokenizer/tokenizer_config.json");
    model_file!(src, "tokenizer/special_tokens_map.json");
    model_file!(src, "unet/config.json");
    model_file!(src, "unet/diffusion_pytorch_model.safetensors");
    model_file!(src, "vae/config.json");
    model_file!(src, "vae/diffusion_pytorch_model.safetensors");
    model_file!(src, "scheduler/scheduler_config.json");
    let sd = StableDiffusion::load(&ctx, &src, LoadPolicy::F32).unwrap();
    let req = Request {
        prompt: "a red cube on a blue table, studio lighting".into(),
        negative_prompt: "blurry, low quality".into(),
        seed: 1,
        steps: 6,
        guidance: 7.5,
        width: Some(96),
        height: Some(64),
        scheduler: Some("dpm++2m".parse().unwrap()),
    };
    let mut steps = 0;
    let mut on_step = |_: &latent_gen::pipeline::Step<'_>| {
        steps += 1;
        Ok(Control::Continue)
    };
    let image = sd.generate(&req, &mut on_step).await.unwrap();
    assert_eq!(steps, 6);
    let refs = include_bytes!("../../tests/fixtures/refs/pipelines/sd1-tiny_dpm++2m_s1_6steps_g7.5_96x64.safetensors");
    let refs = safetensors::SafeTensors::deserialize(refs).unwrap();
    let want = refs.tensor("image").unwrap();
    let rgb: Vec<u8> = image.rgba.chunks(4).flat_map(|p| p[..3].to_vec()).collect();
    let mse: f64 =
        rgb.iter().zip(want.data()).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>() / rgb.len() as f64;
    let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB against diffusers");
}
