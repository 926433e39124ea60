//! LoRAs and textual-inversion embeddings against diffusers (tests/fixtures/refs/lora, made by
//! scripts/make-lora-fixtures): `load_lora_weights` + `fuse_lora` for kohya (diffusers and original SD names,
//! LoCon convolutions) and PEFT files, two LoRAs at once, SD 1.x and 2.x; `load_textual_inversion` for A1111
//! (.safetensors and .pt) and diffusers files; and the files that must be refused, with their reasons.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use latent_gen::gpu::GpuContext;
use latent_gen::pipeline::{Adapters, Control, Request, StableDiffusion};
use latent_gen::weights::embedding::Embedding;
use latent_gen::weights::lora::{Lora, LoraFormat};
use latent_gen::weights::{LoadPolicy, Safetensors, TensorSource};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn context() -> GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        pollster::block_on(GpuContext::new()).unwrap_or_else(|e| panic!("adapter tests need a GPU adapter: {e}"))
    })
    .clone()
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("refs/lora/cases.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    index["cases"].as_array().unwrap().clone()
}

fn case(name: &str) -> serde_json::Value {
    cases().into_iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"))
}

fn request(case: &serde_json::Value) -> Request {
    Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative"].as_str().unwrap().into(),
        seed: case["seed"].as_u64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap() as f32,
        width: Some(case["width"].as_u64().unwrap() as usize),
        height: Some(case["height"].as_u64().unwrap() as usize),
        scheduler: Some("ddim".parse().unwrap()),
        // diffusers reads prompts literally.
        literal_prompt: true,
        ..Default::default()
    }
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

/// The reference's image (RGB bytes) and final latent.
fn reference(case: &serde_json::Value) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let refs = Safetensors::open(&fixtures().join("refs/lora").join(case["file"].as_str().unwrap())).unwrap();
    let f32s = |n: &str| refs.tensor(n).unwrap().to_f32(n).unwrap();
    (refs.tensor("image").unwrap().data.to_vec(), f32s("final"), f32s("context"))
}

/// Our image (RGB bytes) and final latent for a case.
fn generate(sd: &StableDiffusion, case: &serde_json::Value) -> (Vec<u8>, Vec<f32>) {
    let ctx = context();
    let mut go = |_: &latent_gen::pipeline::Step<'_>| Ok(Control::Continue);
    let latents = pollster::block_on(sd.denoise(&request(case), &mut go)).unwrap();
    let image = pollster::block_on(sd.decode(&latents)).unwrap();
    let rgb = image.rgba.chunks(4).flat_map(|p| p[..3].to_vec()).collect();
    (rgb, pollster::block_on(latents.to_vec_f32(&ctx)).unwrap())
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn lora(file: &str) -> Lora {
    Lora::open(&fixtures().join("lora").join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every LoRA case equals diffusers' fused pipeline (PSNR >= 40 dB, final latent within 1e-3), and differs
/// from the same request without the LoRA as much as diffusers' does.
#[test]
fn loras_match_diffusers_fuse_lora() {
    let ctx = context();
    let mut base: HashMap<String, Vec<u8>> = HashMap::new();
    for c in cases().iter().filter(|c| c.get("embeddings").is_none()) {
        let name = c["name"].as_str().unwrap();
        let loras: Vec<(Lora, f32)> = c["loras"]
            .as_array()
            .map(|l| {
                l.iter().map(|l| (lora(l["file"].as_str().unwrap()), l["scale"].as_f64().unwrap() as f32)).collect()
            })
            .unwrap_or_default();
        let refs: Vec<(&Lora, f32)> = loras.iter().map(|(l, s)| (l, *s)).collect();
        let adapters = Adapters { loras: &refs, embeddings: &[] };
        let sd = StableDiffusion::load_with(
            &ctx,
            &latent_gen::pipeline::DirSource(model(c["model"].as_str().unwrap())),
            LoadPolicy::F32,
            adapters,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(sd.adapter_warnings.is_empty(), "{name}: {:?}", sd.adapter_warnings);
        let (rgb, latent) = generate(&sd, c);
        let (want, want_latent, _) = reference(c);
        let db = psnr(&rgb, &want);
        let err = rel_l2(&latent, &want_latent);
        println!("{name}: PSNR {db:.1} dB against diffusers, final latent rel error {err:.2e}");
        assert!(db >= 40.0, "{name}: PSNR {db:.1} dB < 40");
        assert!(err <= 1e-3, "{name}: final latent off by {err:.2e}");
        if name.ends_with("-base") {
            base.insert(c["model"].as_str().unwrap().into(), rgb);
        } else {
            let apart = psnr(&rgb, &base[c["model"].as_str().unwrap()]);
            assert!(apart < 30.0, "{name}: the LoRA barely changed the image ({apart:.1} dB from the base)");
        }
    }
    assert_eq!(base.len(), 2, "both models' base cases ran");
}

/// The embeddings case: the tokens (triggers expanded to one id per vector, after the vocabulary in load
/// order), the text embeddings and the image equal diffusers' load_textual_inversion.
#[test]
fn embeddings_match_diffusers_textual_inversion() {
    let ctx = context();
    let c = case("sd1-embeddings");
    let files: Vec<Embedding> = c["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Embedding::open(&fixtures().join("embeddings").join(f.as_str().unwrap())).unwrap())
        .collect();
    let triggers: Vec<(&str, usize)> = files.iter().map(|e| (e.trigger.as_str(), e.vectors())).collect();
    assert_eq!(triggers, [("tiny-style", 2), ("tiny-thing", 3), ("<tiny-cat>", 1)]);
    let refs: Vec<&Embedding> = files.iter().collect();
    let sd = StableDiffusion::load_with(
        &ctx,
        &latent_gen::pipeline::DirSource(model("sd1-tiny")),
        LoadPolicy::F32,
        Adapters { loras: &[], embeddings: &refs },
    )
    .unwrap();
    let req = request(&c);
    let ids = sd.tokenizer.encode(&req.prompt).unwrap();
    let want_ids: Vec<u32> = c["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want_ids);
    // The prompt meter counts the vectors.
    let (tokens, _) = sd.tokenizer.measure(&req.prompt, true).unwrap();
    assert_eq!(tokens, want_ids.iter().filter(|&&i| !(49406..49408).contains(&i)).count());
    let (want_rgb, _, want_context) = reference(&c);
    let context = sd.encode_prompts(&[&req.negative_prompt, &req.prompt]).unwrap();
    let got = pollster::block_on(context.to_vec_f32(&ctx)).unwrap();
    let err = rel_l2(&got, &want_context);
    assert!(err <= 1e-4, "text embeddings off by {err:.2e}");
    let (rgb, _) = generate(&sd, &c);
    let db = psnr(&rgb, &want_rgb);
    println!("embeddings: text embeddings rel error {err:.2e}, PSNR {db:.1} dB against diffusers");
    assert!(db >= 40.0, "PSNR {db:.1} dB < 40");
}

/// A safetensors file of f32 tensors, in memory.
fn file(tensors: &[(&str, Vec<usize>)], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let data: Vec<Vec<f32>> = tensors.iter().map(|(_, s)| vec![0.01; s.iter().product()]).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d));
            (n.to_string(), view.unwrap())
        })
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

fn kohya(module: &str, down: Vec<usize>, up: Vec<usize>) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{module}.lora_down.weight"), down),
        (format!("{module}.lora_up.weight"), up),
        (format!("{module}.alpha"), vec![]),
    ]
}

fn named(t: &[(String, Vec<usize>)]) -> Vec<(&str, Vec<usize>)> {
    t.iter().map(|(n, s)| (n.as_str(), s.clone())).collect()
}

fn load_error(lora: &Lora) -> String {
    let adapters = Adapters { loras: &[(lora, 1.0)], embeddings: &[] };
    match StableDiffusion::load_with(
        &context(),
        &latent_gen::pipeline::DirSource(model("sd1-tiny")),
        LoadPolicy::F32,
        adapters,
    ) {
        Ok(_) => panic!("{} loaded", lora.name),
        Err(e) => e.to_string(),
    }
}

/// Files that are not LoRAs we can merge fail with a message that says what they are; keys nothing reads
/// are listed in a warning.
#[test]
fn bad_loras_are_refused_with_reasons() {
    let to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let good = kohya(to_q, vec![4, 24], vec![24, 4]);
    // Truncated.
    let mut bytes = file(&named(&good), None);
    bytes.truncate(bytes.len() - 10);
    let e = Lora::from_bytes("cut", bytes).err().expect("a truncated file is refused").to_string();
    assert!(e.contains("truncated"), "{e}");
    // Other architectures, named.
    let sdxl =
        [good.clone(), kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1", vec![4, 1280], vec![5120, 4])].concat();
    let e = Lora::from_bytes("xl", file(&named(&sdxl), None)).err().expect("SDXL is refused").to_string();
    assert!(e.contains("SDXL"), "{e}");
    let flux = kohya("lora_unet_double_blocks_0_img_attn_qkv", vec![4, 3072], vec![9216, 4]);
    let e = Lora::from_bytes("flux", file(&named(&flux), None)).err().expect("Flux is refused").to_string();
    assert!(e.contains("Flux"), "{e}");
    // An SD 2.x LoRA on an SD 1.x model: its cross-attention reads 1024-wide text.
    let sd2 = kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", vec![4, 1024], vec![24, 4]);
    let l = Lora::from_bytes("sd2", file(&named(&sd2), None)).unwrap();
    let e = load_error(&l);
    assert!(e.contains("SD 2.x") && e.contains("1024"), "{e}");
    // Rank mismatch, a missing factor, DoRA, LoHa, not a LoRA at all.
    let e =
        Lora::from_bytes("r", file(&named(&kohya(to_q, vec![4, 24], vec![24, 8])), None)).err().unwrap().to_string();
    assert!(e.contains("rank mismatch") && e.contains("rank 4") && e.contains("rank 8"), "{e}");
    let e = Lora::from_bytes("m", file(&[(&format!("{to_q}.lora_down.weight"), vec![4, 24])], None))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no lora_up"), "{e}");
    let dora = [good.clone(), vec![(format!("{to_q}.dora_scale"), vec![1, 24])]].concat();
    let e = Lora::from_bytes("d", file(&named(&dora), None)).err().unwrap().to_string();
    assert!(e.contains("DoRA"), "{e}");
    let loha = [(format!("{to_q}.hada_w1_a"), vec![24, 4]), (format!("{to_q}.hada_w1_b"), vec![4, 24])];
    let e = Lora::from_bytes("h", file(&named(&loha), None)).err().unwrap().to_string();
    assert!(e.contains("LoHa"), "{e}");
    let e = Lora::from_bytes("x", file(&[("model.weight", vec![2, 2])], None)).err().unwrap().to_string();
    assert!(e.contains("not a LoRA"), "{e}");
    // A shape that fits no layer of this model.
    let wide = kohya(to_q, vec![4, 320], vec![320, 4]);
    let e = load_error(&Lora::from_bytes("w", file(&named(&wide), None)).unwrap());
    assert!(e.contains("[24, 24]") && e.contains("another model"), "{e}");
    // Unknown keys load with a warning naming them.
    let extra =
        [good.clone(), kohya("lora_unet_no_such_layer", vec![4, 24], vec![24, 4]), vec![("stray".into(), vec![2])]]
            .concat();
    let l = Lora::from_bytes("extra", file(&named(&extra), None)).unwrap();
    assert_eq!(l.format, LoraFormat::Kohya);
    assert_eq!(l.unknown, ["stray"]);
    let adapters = Adapters { loras: &[(&l, 1.0)], embeddings: &[] };
    let sd = StableDiffusion::load_with(
        &context(),
        &latent_gen::pipeline::DirSource(model("sd1-tiny")),
        LoadPolicy::F32,
        adapters,
    )
    .unwrap();
    let [w] = sd.adapter_warnings.as_slice() else { panic!("{:?}", sd.adapter_warnings) };
    assert!(
        w.contains("lora_unet_no_such_layer.lora_down.weight") && w.contains("stray") && w.contains("2 tensors"),
        "{w}"
    );
    // None of the layers fits: an error, not a silent no-op.
    let none = kohya("lora_unet_no_such_layer", vec![4, 24], vec![24, 4]);
    let e = load_error(&Lora::from_bytes("none", file(&named(&none), None)).unwrap());
    assert!(e.contains("none of the 1 layers"), "{e}");
}

/// Embeddings that cannot be used say why: another family's width, SDXL's pair, a file with no embedding.
#[test]
fn bad_embeddings_are_refused_with_reasons() {
    let e = Embedding::from_bytes("wide.safetensors", file(&[("emb_params", vec![2, 1024])], None)).unwrap();
    assert_eq!(e.trigger, "wide");
    let refs = [&e];
    let adapters = Adapters { loras: &[], embeddings: &refs };
    let err = StableDiffusion::load_with(
        &context(),
        &latent_gen::pipeline::DirSource(model("sd1-tiny")),
        LoadPolicy::F32,
        adapters,
    )
    .err()
    .expect("a 1024-wide embedding on a 16-wide text encoder")
    .to_string();
    assert!(err.contains("SD 2.x") && err.contains("16 wide"), "{err}");
    let xl = file(&[("clip_l", vec![1, 768]), ("clip_g", vec![1, 1280])], None);
    let err = Embedding::from_bytes("xl.safetensors", xl).unwrap_err().to_string();
    assert!(err.contains("SDXL"), "{err}");
    let err = Embedding::from_bytes("two.safetensors", file(&[("a", vec![16]), ("b", vec![16])], None)).unwrap_err();
    assert!(err.to_string().contains("not a textual-inversion embedding"), "{err}");
    let err = Embedding::from_bytes("junk.pt", b"PK\x03\x04junk".to_vec()).unwrap_err().to_string();
    assert!(err.contains("junk.pt") && err.contains("torch"), "{err}");
}

/// A LoRA merges into a single-file checkpoint (original SD names behind diffusers names) exactly as into
/// its folder, and into a q8_0 GGUF (dequantized, merged, requantized on the device) and a folder quantized
/// while loading close to the f32 result.
#[test]
fn loras_merge_into_single_files_and_quantized_weights() {
    let ctx = context();
    let c = case("sd1-kohya");
    let l = lora("sd1-kohya.safetensors");
    let loras = [(&l, 0.8f32)];
    let adapters = Adapters { loras: &loras, embeddings: &[] };
    let (want, _, _) = reference(&c);
    let config = model("sd1-tiny");
    let q8 = LoadPolicy { act: latent_gen::gpu::DType::F32, weights: latent_gen::gpu::DType::Q8_0 };
    for (file, policy, min_db) in
        [("sd1-tiny.safetensors", LoadPolicy::F32, 40.0), ("sd1-tiny-q8_0.gguf", LoadPolicy::F32, 40.0)]
    {
        let src = latent_gen::pipeline::open_model(&fixtures().join("formats").join(file), Some(&config)).unwrap();
        let sd =
            StableDiffusion::load_with(&ctx, src.as_ref(), policy, adapters).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(sd.adapter_warnings.is_empty(), "{file}: {:?}", sd.adapter_warnings);
        let db = psnr(&generate(&sd, &c).0, &want);
        println!("{file} with the LoRA: PSNR {db:.1} dB against diffusers");
        assert!(db >= min_db, "{file}: PSNR {db:.1} dB < {min_db}");
    }
    let sd = StableDiffusion::load_with(&ctx, &latent_gen::pipeline::DirSource(config), q8, adapters).unwrap();
    let db = psnr(&generate(&sd, &c).0, &want);
    println!("folder quantized to q8_0 with the LoRA: PSNR {db:.1} dB against diffusers");
    assert!(db >= 40.0, "q8_0: PSNR {db:.1} dB < 40");
}
