//! A whole tiny Stable Diffusion pipeline in the browser (wasm-bindgen-test in headless Chromium, WebGPU on
//! SwiftShader, f32 path): the fixture model and request give diffusers' image within PSNR 40 dB.
#![cfg(target_arch = "wasm32")]

use latent_gen::gpu::GpuContext;
use latent_gen::pipeline::{Control, MemorySource, Request, StableDiffusion};
use latent_gen::weights::LoadPolicy;
use wasm_bindgen_test::wasm_bindgen_test;

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

const FILES: [(&str, &[u8]); 12] = [
    ("model_index.json", include_bytes!("../../tests/fixtures/models/sd1-tiny/model_index.json")),
    ("text_encoder/config.json", include_bytes!("../../tests/fixtures/models/sd1-tiny/text_encoder/config.json")),
    (
        "text_encoder/model.safetensors",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/text_encoder/model.safetensors"),
    ),
    ("tokenizer/vocab.json", include_bytes!("../../tests/fixtures/models/sd1-tiny/tokenizer/vocab.json")),
    ("tokenizer/merges.txt", include_bytes!("../../tests/fixtures/models/sd1-tiny/tokenizer/merges.txt")),
    (
        "tokenizer/tokenizer_config.json",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/tokenizer/tokenizer_config.json"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/tokenizer/special_tokens_map.json"),
    ),
    ("unet/config.json", include_bytes!("../../tests/fixtures/models/sd1-tiny/unet/config.json")),
    (
        "unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/unet/diffusion_pytorch_model.safetensors"),
    ),
    ("vae/config.json", include_bytes!("../../tests/fixtures/models/sd1-tiny/vae/config.json")),
    (
        "vae/diffusion_pytorch_model.safetensors",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/vae/diffusion_pytorch_model.safetensors"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_bytes!("../../tests/fixtures/models/sd1-tiny/scheduler/scheduler_config.json"),
    ),
];

/// The request whose diffusers image is the reference fixture `sd1-tiny_dpm++2m_s1_6steps_g7.5_96x64`.
fn fixture_request() -> Request {
    Request {
        prompt: "a red cube on a blue table, studio lighting".into(),
        negative_prompt: "blurry, low quality".into(),
        seed: 1,
        steps: 6,
        guidance: 7.5,
        width: Some(96),
        height: Some(64),
        scheduler: Some("dpm++2m".parse().unwrap()),
        ..Default::default()
    }
}

fn psnr(rgba: &[u8], want_rgb: &[u8]) -> f64 {
    let rgb: Vec<u8> = rgba.chunks(4).flat_map(|p| p[..3].to_vec()).collect();
    let mse: f64 =
        rgb.iter().zip(want_rgb).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>() / rgb.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

fn get(obj: &wasm_bindgen::JsValue, key: &str) -> wasm_bindgen::JsValue {
    js_sys::Reflect::get(obj, &key.into()).unwrap()
}

/// The worker verifies downloads with this hasher: FIPS 180-2's "abc" vector, fed in two pieces.
#[wasm_bindgen_test]
fn sha256_hashes_incrementally() {
    let mut h = latent_gen::web::Sha256::new();
    h.update(b"a");
    h.update(b"bc");
    assert_eq!(h.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(h.hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "starts over");
}

/// The worker's API: load a model from a Map of files, generate with a preview per step, cancel.
#[wasm_bindgen_test]
async fn engine_generates_with_previews_and_cancels() {
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;
    let engine = latent_gen::web::Engine::create(false, true, None, None).await.unwrap_or_else(|_| panic!("no engine"));
    assert!(!engine.is_cpu(), "the browser test must run on WebGPU");
    assert_eq!(engine.kernel_variant(), None);
    let files = js_sys::Map::new();
    for (path, bytes) in FILES {
        files.set(&path.into(), &js_sys::Uint8Array::from(bytes).into());
    }
    let info = engine.load_model(files, "sd1-tiny".into(), "f32".into()).unwrap_or_else(|_| panic!("loadModel failed"));
    assert_eq!(get(&info, "sizeMultiple").as_f64(), Some(16.0));
    let request = serde_wasm_bindgen::to_value(&fixture_request()).unwrap();
    let previews = std::rc::Rc::new(std::cell::RefCell::new(Vec::<Vec<u8>>::new()));
    let seen = previews.clone();
    let on_step = Closure::wrap(Box::new(move |ev: wasm_bindgen::JsValue| {
        let p = get(&ev, "preview");
        assert_eq!((get(&p, "width").as_f64(), get(&p, "height").as_f64()), (Some(12.0), Some(8.0)));
        seen.borrow_mut().push(js_sys::Uint8ClampedArray::new(&get(&p, "rgba")).to_vec());
    }) as Box<dyn FnMut(wasm_bindgen::JsValue)>);
    let fun: &js_sys::Function = on_step.as_ref().unchecked_ref();
    let image = wasm_bindgen_futures::JsFuture::from(engine.generate(request.clone(), fun.clone())).await.unwrap();
    let previews = previews.borrow().clone();
    assert_eq!(previews.len(), 6, "one preview per step");
    assert!(previews.windows(2).all(|w| w[0] != w[1]), "the preview changes after every step");
    let rgba = js_sys::Uint8ClampedArray::new(&get(&image, "rgba")).to_vec();
    let parameters = get(&image, "parameters").as_string().unwrap();
    assert!(parameters.contains("Seed: 1, Size: 96x64, Model: sd1-tiny"), "{parameters}");
    let png = js_sys::Uint8Array::new(&get(&image, "png")).to_vec();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let refs = include_bytes!("../../tests/fixtures/refs/pipelines/sd1-tiny_dpm++2m_s1_6steps_g7.5_96x64.safetensors");
    let refs = safetensors::SafeTensors::deserialize(refs).unwrap();
    let db = psnr(&rgba, refs.tensor("image").unwrap().data());
    assert!(db >= 40.0, "PSNR {db:.1} dB");
    // Cancelling from the step callback stops the run with a "cancelled" error.
    let engine = std::rc::Rc::new(engine);
    let handle = engine.clone();
    let cancel = Closure::wrap(
        Box::new(move |_: wasm_bindgen::JsValue| handle.cancel()) as Box<dyn FnMut(wasm_bindgen::JsValue)>
    );
    let err = wasm_bindgen_futures::JsFuture::from(
        engine.generate(request, cancel.as_ref().unchecked_ref::<js_sys::Function>().clone()),
    )
    .await
    .expect_err("a cancelled run rejects");
    let msg = js_sys::Error::from(err).message().as_string().unwrap_or_default();
    assert!(msg.contains("cancelled"), "{msg}");
}

/// The fixture on WebGPU with the default kernels, and again with the kernel variants the diagnostics page
/// can choose (two attention queries per invocation, double-buffered GEMM tiles, split-K on every GEMM with k
/// long enough) at once.
#[wasm_bindgen_test]
async fn tiny_pipeline_matches_diffusers_in_the_browser() {
    use latent_gen::gpu::Tuning;
    let ctx = GpuContext::new().await.unwrap_or_else(|e| panic!("the browser test needs WebGPU: {e}"));
    let psnr = fixture_psnr(&ctx).await;
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB against diffusers");
    let tuning =
        Tuning { attention_queries: 2, gemm_double_buffer: true, split_k_below: 1 << 20, ..Default::default() };
    let psnr = fixture_psnr(&ctx.with_tuning(tuning)).await;
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB against diffusers with the kernel variants");
}

/// The generator's engine takes the kernel variant the diagnostics page kept, on the adapter it was found on
/// only, and a name it knows only.
#[wasm_bindgen_test]
async fn engine_takes_a_kept_kernel_variant() {
    use latent_gen::web::Engine;
    let plain = Engine::create(false, true, None, None).await.unwrap_or_else(|_| panic!("no engine"));
    let adapter = get(&plain.adapter().unwrap_or_else(|_| panic!("no adapter")), "name").as_string().unwrap();
    let engine = |a: &str, v: &str| Engine::create(false, true, Some(a.to_string()), Some(v.to_string()));
    let kept = engine(&adapter, "split-k-512").await.unwrap_or_else(|_| panic!("no engine"));
    assert_eq!(kept.kernel_variant().as_deref(), Some("split-k-512"));
    let other = engine("another GPU", "split-k-512").await.unwrap_or_else(|_| panic!("no engine"));
    assert_eq!(other.kernel_variant(), None, "a variant found on another adapter is not used");
    let unknown = engine(&adapter, "no-such-variant").await.unwrap_or_else(|_| panic!("no engine"));
    assert_eq!(unknown.kernel_variant(), None, "an unknown name keeps the defaults");
}

/// The CPU path as a browser without WebGPU runs it (candle in wasm, one thread, the gemm crate's simd128
/// kernels, 3x3 convs as Winograd F(2x2, 3x3)): the same fixture within PSNR 40 dB of diffusers.
#[wasm_bindgen_test]
async fn tiny_pipeline_on_the_cpu_path_matches_diffusers_in_the_browser() {
    let psnr = fixture_psnr(&GpuContext::cpu()).await;
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB against diffusers on the CPU path");
}

/// The fixture model and request on `ctx`: six steps, then the image's PSNR against diffusers'.
async fn fixture_psnr(ctx: &GpuContext) -> f64 {
    let mut src = MemorySource::new();
    for (path, bytes) in FILES {
        src.insert(path, bytes.to_vec());
    }
    let sd = StableDiffusion::load(ctx, &src, LoadPolicy::F32).unwrap();
    let req = fixture_request();
    let mut steps = 0;
    let mut on_step = |_: &latent_gen::pipeline::Step<'_>| {
        steps += 1;
        Ok(Control::Continue)
    };
    let image = sd.generate(&req, &mut on_step).await.unwrap();
    assert_eq!(steps, 6);
    let refs = include_bytes!("../../tests/fixtures/refs/pipelines/sd1-tiny_dpm++2m_s1_6steps_g7.5_96x64.safetensors");
    let refs = safetensors::SafeTensors::deserialize(refs).unwrap();
    psnr(&image.rgba, refs.tensor("image").unwrap().data())
}

/// Under artificially lowered WebGPU limits (2 MiB bindings and buffers, as `ContextOptions` caps them) the
/// browser still generates at 192x192: weights go up in blocks, the VAE decodes in blended tiles, and the
/// image stays close to the unlimited one; a size whose UNet cannot fit is refused up front, naming the limit.
#[wasm_bindgen_test]
async fn lowered_limits_still_generate_in_the_browser() {
    use latent_gen::gpu::ContextOptions;
    let cap = 2 << 20;
    let options = ContextOptions { max_binding: Some(cap), max_buffer: Some(cap), ..Default::default() };
    let limited = GpuContext::with_options(options).await.unwrap_or_else(|e| panic!("capped limits: {e}"));
    assert_eq!(limited.summary().max_storage_buffer_binding_size, cap);
    let full = GpuContext::new().await.unwrap_or_else(|e| panic!("the browser test needs WebGPU: {e}"));
    let mut src = MemorySource::new();
    for (path, bytes) in FILES {
        src.insert(path, bytes.to_vec());
    }
    let req = Request {
        prompt: "a photograph of an astronaut riding a horse".into(),
        seed: 3,
        steps: 2,
        width: Some(192),
        height: Some(192),
        scheduler: Some("ddim".parse().unwrap()),
        ..Default::default()
    };
    let mut go = |_: &latent_gen::pipeline::Step<'_>| Ok(Control::Continue);
    let want = StableDiffusion::load(&full, &src, LoadPolicy::F32).unwrap().generate(&req, &mut go).await.unwrap();
    let small = StableDiffusion::load(&limited, &src, LoadPolicy::F32).unwrap();
    assert_eq!(small.decode_tile(latent_gen::gpu::DType::F32).unwrap(), 16, "the decode is tiled");
    let got = small.generate(&req, &mut go).await.unwrap_or_else(|e| panic!("under 2 MiB limits: {e}"));
    let rgb: Vec<u8> = want.rgba.chunks(4).flat_map(|p| p[..3].to_vec()).collect();
    let db = psnr(&got.rgba, &rgb);
    assert!(db >= 25.0, "PSNR {db:.1} dB against the unlimited image");
    let huge = Request { width: Some(1024), height: Some(1024), ..req };
    let e = small.start(&huge).err().expect("refused").to_string();
    assert!(e.contains("maxStorageBufferBindingSize") && e.contains("2 MiB"), "{e}");
}
