//! Our GPU models against an independent Rust reference: candle-transformers' CLIP text transformer, Stable
//! Diffusion UNet and AutoencoderKL on candle's CPU, in f32, with the same weights and inputs (issue 14).
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType as CpuDType, Device, Tensor as CpuTensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModel as CandleUNet, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use latent_gen::gpu::{GpuContext, Tensor};
use latent_gen::models::clip::ClipTextModel;
use latent_gen::models::parse_config;
use latent_gen::models::unet_2d::UNet2DConditionModel;
use latent_gen::models::vae::{Decoder, Encoder, VaeConfig};
use latent_gen::rng::TorchRng;
use latent_gen::weights::{LoadPolicy, Safetensors, TensorSource, Weights};
use serde_json::Value;

/// The diffusers folders compared: the fixture models (with diffusers/transformers outputs in
/// tests/fixtures/refs) and the bundled tiny-shapes (no fixture outputs; seeded random inputs).
const MODELS: [&str; 3] =
    ["tests/fixtures/models/sd1-tiny", "tests/fixtures/models/sd2-tiny", "www/models/tiny-shapes"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn context() -> GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        pollster::block_on(GpuContext::new()).unwrap_or_else(|e| panic!("reference tests need a GPU adapter: {e}"))
    })
    .clone()
}

fn name(model: &str) -> &str {
    model.rsplit('/').next().unwrap()
}

fn json(model: &str, sub: &str) -> Value {
    let path = root().join(model).join(sub).join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn weights_path(model: &str, sub: &str) -> PathBuf {
    let file = if sub == "text_encoder" { "model.safetensors" } else { "diffusion_pytorch_model.safetensors" };
    root().join(model).join(sub).join(file)
}

/// A checkpoint's tensors on candle's CPU (f16/bf16 ones are widened to f32 by the `VarBuilder`, exactly as
/// our `LoadPolicy::F32` widens them).
fn cpu_tensors(model: &str, sub: &str) -> HashMap<String, CpuTensor> {
    candle_core::safetensors::load(weights_path(model, sub), &Device::Cpu).unwrap()
}

fn var_builder(tensors: HashMap<String, CpuTensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, CpuDType::F32, &Device::Cpu)
}

/// Our model's weights and its config, parsed by our own code.
fn ours<T: serde::de::DeserializeOwned>(model: &str, sub: &str) -> (Safetensors, T) {
    let src = Safetensors::open(&weights_path(model, sub)).unwrap();
    let path = root().join(model).join(sub).join("config.json");
    let cfg = parse_config(&std::fs::read_to_string(&path).unwrap(), &path.to_string_lossy()).unwrap();
    (src, cfg)
}

/// The fixture's reference file for a component, when the model has one.
fn fixture(model: &str, file: &str) -> Option<Safetensors> {
    let path = root().join("tests/fixtures/refs").join(name(model)).join(file);
    path.exists().then(|| Safetensors::open(&path).unwrap())
}

fn fixture_f32(refs: &Safetensors, key: &str) -> (Vec<usize>, Vec<f32>) {
    let t = refs.tensor(key).unwrap_or_else(|| panic!("reference tensor {key} missing"));
    (t.shape.to_vec(), t.to_f32(key).unwrap())
}

fn to_vec(t: &CpuTensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn cpu(shape: &[usize], data: &[f32]) -> CpuTensor {
    CpuTensor::from_slice(data, shape, &Device::Cpu).unwrap()
}

fn gpu(ctx: &GpuContext, shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_f32(ctx, shape, data).unwrap()
}

fn download(ctx: &GpuContext, t: &Tensor) -> Vec<f32> {
    pollster::block_on(t.to_vec_f32(ctx)).unwrap()
}

/// Relative L2 error ||a - b|| / ||b||, max abs error, and the worst index with both values.
struct Diff {
    rel: f32,
    abs: f32,
    worst: String,
}

fn diff(a: &[f32], b: &[f32]) -> Diff {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let (i, abs) =
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).enumerate().fold((0, 0.0), |m, e| if e.1 > m.1 { e } else { m });
    Diff { rel: (num / den.max(1e-30)).sqrt() as f32, abs, worst: format!("index {i}: {} vs {}", a[i], b[i]) }
}

/// Prints ours against candle and, where the fixture has it, both against diffusers/transformers (so a
/// disagreement says who is wrong).
fn report(what: &str, ours: &[f32], candle: &[f32], fixture: Option<&[f32]>) -> Diff {
    let d = diff(ours, candle);
    let mut line = format!("{what}: ours vs candle rel {:.2e}, max abs {:.2e}", d.rel, d.abs);
    if let Some(want) = fixture {
        let (o, c) = (diff(ours, want), diff(candle, want));
        line += &format!(
            "; vs the fixture: ours rel {:.2e} max abs {:.2e}, candle rel {:.2e} max abs {:.2e}",
            o.rel, o.abs, c.rel, c.abs
        );
    }
    println!("{line}");
    d
}

fn usize_of(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("{key}: not an integer")) as usize
}

/// A per-block key (an integer or a list) as one value per block.
fn per_block(v: &Value, key: &str, n: usize) -> Vec<usize> {
    match &v[key] {
        Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap() as usize).collect(),
        x => vec![x.as_u64().unwrap_or_else(|| panic!("{key}: {x}")) as usize; n],
    }
}

/// Asserts that a config key holds what candle-transformers' module hard-codes.
fn expect(v: &Value, key: &str, want: Value, module: &str) {
    let got = v.get(key).cloned().unwrap_or(Value::Null);
    assert_eq!(got, want, "candle-transformers' {module} cannot express {key} = {got}");
}

/// candle-transformers' CLIP text config from transformers' `CLIPTextConfig`, or None when it cannot express it.
///
/// This is `models::clip::text_model`, the general CLIP: the Stable Diffusion module's `clip::Config` keeps its
/// fields private (only presets), and both hard-code the layer norms' eps (1e-5) and the causal mask. The general
/// one knows only quick_gelu, so SD 2.x's "gelu" (erf) text encoder has no candle reference (the SD module's
/// `v2_1` preset uses `Activation::Gelu`, which is candle's tanh approximation, not transformers' erf "gelu").
fn clip_config(v: &Value) -> Option<ClipTextConfig> {
    if v["hidden_act"] != "quick_gelu" {
        return None;
    }
    expect(v, "layer_norm_eps", 1e-5.into(), "CLIP");
    Some(ClipTextConfig {
        vocab_size: usize_of(v, "vocab_size"),
        embed_dim: usize_of(v, "hidden_size"),
        activation: Activation::QuickGelu,
        intermediate_size: usize_of(v, "intermediate_size"),
        max_position_embeddings: usize_of(v, "max_position_embeddings"),
        pad_with: None,
        num_hidden_layers: usize_of(v, "num_hidden_layers"),
        num_attention_heads: usize_of(v, "num_attention_heads"),
        projection_dim: usize_of(v, "projection_dim"),
    })
}

/// candle-transformers' UNet config from diffusers' `UNet2DConditionModel` config.json, with (in, out)
/// channels. candle's UNet is SD 1.x/2.x's: positional time embedding, up blocks mirroring the down blocks, one
/// `layers_per_block` and `cross_attention_dim` for all blocks; the rest is asserted. `upcast_attention` (SD 2.x)
/// only matters below f32, and candle's `attention_head_dim` is diffusers' (a number of heads).
fn unet_config(v: &Value) -> (UNet2DConditionModelConfig, usize, usize) {
    for (key, want) in [
        ("mid_block_type", "UNetMidBlock2DCrossAttn".into()),
        ("act_fn", "silu".into()),
        ("time_embedding_type", "positional".into()),
        ("resnet_time_scale_shift", "default".into()),
        ("time_cond_proj_dim", Value::Null),
        ("class_embed_type", Value::Null),
        ("addition_embed_type", Value::Null),
        ("encoder_hid_dim", Value::Null),
        ("only_cross_attention", false.into()),
        ("dual_cross_attention", false.into()),
        ("conv_in_kernel", 3.into()),
        ("conv_out_kernel", 3.into()),
        ("attention_type", "default".into()),
        ("cross_attention_norm", Value::Null),
    ] {
        expect(v, key, want, "UNet");
    }
    let down: Vec<&str> = v["down_block_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let up: Vec<&str> = v["up_block_types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mirrored: Vec<String> = down.iter().rev().map(|t| t.replace("Down", "Up")).collect();
    assert_eq!(up, mirrored, "candle-transformers' UNet needs up blocks mirroring the down blocks");
    let n = down.len();
    let channels = per_block(v, "block_out_channels", n);
    // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
    let heads_key = if v["num_attention_heads"].is_null() { "attention_head_dim" } else { "num_attention_heads" };
    let heads = per_block(v, heads_key, n);
    let transformers = per_block(v, "transformer_layers_per_block", n);
    let blocks = (0..n)
        .map(|i| BlockConfig {
            out_channels: channels[i],
            use_cross_attn: (down[i] == "CrossAttnDownBlock2D").then_some(transformers[i]),
            attention_head_dim: heads[i],
        })
        .collect::<Vec<_>>();
    // candle's mid block takes the last block's transformer depth (1 without cross-attention), diffusers' the last entry.
    let mid_depth = blocks[n - 1].use_cross_attn.unwrap_or(1);
    assert_eq!(mid_depth, transformers[n - 1], "candle-transformers' UNet cannot express the mid block's depth");
    let cfg = UNet2DConditionModelConfig {
        center_input_sample: v["center_input_sample"].as_bool().unwrap(),
        flip_sin_to_cos: v["flip_sin_to_cos"].as_bool().unwrap(),
        freq_shift: v["freq_shift"].as_f64().unwrap(),
        blocks,
        layers_per_block: usize_of(v, "layers_per_block"),
        downsample_padding: usize_of(v, "downsample_padding"),
        mid_block_scale_factor: v["mid_block_scale_factor"].as_f64().unwrap(),
        norm_num_groups: usize_of(v, "norm_num_groups"),
        norm_eps: v["norm_eps"].as_f64().unwrap(),
        cross_attention_dim: usize_of(v, "cross_attention_dim"),
        sliced_attention_size: None,
        use_linear_projection: v["use_linear_projection"].as_bool().unwrap(),
    };
    (cfg, usize_of(v, "in_channels"), usize_of(v, "out_channels"))
}

/// candle-transformers' AutoencoderKL config from diffusers' config.json, with (in, out) channels.
fn vae_config(v: &Value) -> (AutoEncoderKLConfig, usize, usize) {
    let n = v["block_out_channels"].as_array().unwrap().len();
    expect(v, "down_block_types", vec!["DownEncoderBlock2D"; n].into(), "AutoencoderKL");
    expect(v, "up_block_types", vec!["UpDecoderBlock2D"; n].into(), "AutoencoderKL");
    expect(v, "act_fn", "silu".into(), "AutoencoderKL");
    expect(v, "mid_block_add_attention", true.into(), "AutoencoderKL");
    let cfg = AutoEncoderKLConfig {
        block_out_channels: per_block(v, "block_out_channels", n),
        layers_per_block: usize_of(v, "layers_per_block"),
        latent_channels: usize_of(v, "latent_channels"),
        norm_num_groups: usize_of(v, "norm_num_groups"),
        use_quant_conv: v["use_quant_conv"].as_bool().unwrap(),
        use_post_quant_conv: v["use_post_quant_conv"].as_bool().unwrap(),
    };
    (cfg, usize_of(v, "in_channels"), usize_of(v, "out_channels"))
}

/// Token ids of one 77-token prompt: BOS, random tokens, EOS, then EOS padding.
fn random_ids(seed: u64, vocab: usize) -> Vec<u32> {
    let noise = TorchRng::new(seed).randn(75);
    let words = 5 + seed as usize % 20;
    let mut ids = vec![49406];
    ids.extend(noise[..words].iter().map(|x| ((x.abs() * 7919.0) as usize % (vocab - 2)) as u32));
    ids.resize(77, 49407);
    ids
}

#[test]
fn text_encoders_match_candle() {
    let ctx = context();
    let mut compared = 0;
    for model in MODELS {
        let v = json(model, "text_encoder");
        let Some(cfg) = clip_config(&v) else {
            println!("{}: no candle-transformers CLIP for hidden_act {}", name(model), v["hidden_act"]);
            continue;
        };
        let reference =
            ClipTextTransformer::new(var_builder(cpu_tensors(model, "text_encoder")).pp("text_model"), &cfg).unwrap();
        let (src, our_cfg) = ours(model, "text_encoder");
        let te = ClipTextModel::load(&Weights::new(&ctx, &src, LoadPolicy::F32), our_cfg).unwrap();
        let refs = fixture(model, "text_encoder.safetensors");
        for i in 0..4 {
            let ids = match &refs {
                Some(r) => bytemuck::pod_collect_to_vec::<u8, i64>(&r.tensor(&format!("ids_{i}")).unwrap().data)
                    .iter()
                    .map(|&t| t as u32)
                    .collect(),
                None => random_ids(i, cfg.vocab_size),
            };
            let ids_cpu = CpuTensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
            let want = to_vec(&reference.forward_with_mask(&ids_cpu, usize::MAX).unwrap());
            let got = download(&ctx, &te.forward(&ctx, &[ids]).unwrap());
            let emb = refs.as_ref().map(|r| fixture_f32(r, &format!("emb_{i}")).1);
            let d = report(&format!("{} text embedding {i}", name(model)), &got, &want, emb.as_deref());
            assert!(d.abs <= 1e-4, "{} prompt {i}: max abs error {} > 1e-4 at {}", name(model), d.abs, d.worst);
            compared += 1;
        }
    }
    assert_eq!(compared, 8, "sd1-tiny's and tiny-shapes' text encoders");
}

/// A UNet config as candle-transformers' UNet can run it: its DownBlock2D and UpBlock2D drop their
/// `resnet_groups` (the resnets in the down and up blocks always take 32 groups; the mid block, the
/// transformers and conv_norm_out take `norm_num_groups`), so `norm_num_groups` becomes 32 and
/// `block_out_channels` multiples of 32. Only real SD 1.x/2.x UNets (32 groups) are right in candle as they are.
fn with_32_groups(mut v: Value) -> Value {
    let n = v["block_out_channels"].as_array().unwrap().len();
    let channels: Vec<usize> = per_block(&v, "block_out_channels", n).iter().map(|c| c.div_ceil(32) * 32).collect();
    v["block_out_channels"] = channels.into();
    v["norm_num_groups"] = 32.into();
    v
}

/// Seeded weights for every tensor candle's UNet asks for (names and shapes learned by building it over a
/// `VarMap`): norm scales 1 + 0.1 n, biases 0.1 n, other weights n / sqrt(fan_in), in name order.
fn seeded_unet(cfg: &UNet2DConditionModelConfig, cin: usize, cout: usize, seed: u64) -> HashMap<String, CpuTensor> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, CpuDType::F32, &Device::Cpu);
    CandleUNet::new(vb, cin, cout, false, cfg.clone()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> =
        vars.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    shapes.sort();
    let mut rng = TorchRng::new(seed);
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let (mul, add) = match (name.ends_with(".bias"), shape.len()) {
                (true, _) => (0.1, 0.0),
                (false, 1) => (0.1, 1.0),
                (false, _) => (1.0 / ((n / shape[0]) as f32).sqrt(), 0.0),
            };
            let data: Vec<f32> = rng.randn(n).iter().map(|x| x * mul + add).collect();
            (name, cpu(&shape, &data))
        })
        .collect()
}

/// The fixture UNets' architectures and tiny-shapes' UNet at 32 groups (see `with_32_groups`). candle's GEGLU
/// takes the tanh approximation of GELU where diffusers takes erf: that alone puts ours and candle ~1.6e-4 apart
/// (~1e-6 with the feed-forwards' gates scaled near 0, where the two agree); our UNets match diffusers to ~7e-7
/// (tests/models.rs).
#[test]
fn unets_match_candle() {
    let ctx = context();
    for model in MODELS {
        let original = json(model, "unet");
        let v = with_32_groups(original.clone());
        let (cfg, cin, cout) = unet_config(&v);
        // The checkpoint where the channels did not change (norm weights are per channel), else seeded weights.
        let (tensors, path) = if v["block_out_channels"] == original["block_out_channels"] {
            (cpu_tensors(model, "unet"), weights_path(model, "unet"))
        } else {
            let tensors = seeded_unet(&cfg, cin, cout, 5);
            let path =
                PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-unet-32-groups.safetensors", name(model)));
            candle_core::safetensors::save(&tensors, &path).unwrap();
            (tensors, path)
        };
        let reference = CandleUNet::new(var_builder(tensors), cin, cout, false, cfg).unwrap();
        let src = Safetensors::open(&path).unwrap();
        let our_cfg = parse_config(&v.to_string(), &format!("{} unet with 32 groups", name(model))).unwrap();
        let unet = UNet2DConditionModel::load(&Weights::new(&ctx, &src, LoadPolicy::F32), our_cfg).unwrap();

        let mut rng = TorchRng::new(7);
        let (s_shape, e_shape) = ([2, cin, 8, 12], [2, 77, usize_of(&v, "cross_attention_dim")]);
        let (sample, ehs) = (rng.randn(s_shape.iter().product()), rng.randn(e_shape.iter().product()));
        let t = 601.0;
        let want = reference.forward(&cpu(&s_shape, &sample), t as f64, &cpu(&e_shape, &ehs)).unwrap();
        let got = unet.forward(&ctx, &gpu(&ctx, &s_shape, &sample), t, &gpu(&ctx, &e_shape, &ehs), None).unwrap();
        let d = report(&format!("{} unet (32 groups)", name(model)), &download(&ctx, &got), &to_vec(&want), None);
        assert!(d.rel <= 1e-3, "{} unet: relative error {} > 1e-3 (worst {})", name(model), d.rel, d.worst);
    }
}

/// candle's `encode` returns a distribution whose mean is private and whose only reading, `sample()`, adds
/// `std * randn`. The reference's quant_conv gets a log-variance half of zeros with a -1e4 bias, so std = 0
/// and the sample is the mean; the mean half, which our `Encoder` returns, is untouched (a 1x1 conv).
fn zero_variance(tensors: &mut HashMap<String, CpuTensor>, latent_channels: usize) {
    let w = tensors["quant_conv.weight"].narrow(0, 0, latent_channels).unwrap();
    let b = tensors["quant_conv.bias"].narrow(0, 0, latent_channels).unwrap();
    let (zeros, low) = (w.zeros_like().unwrap(), (b.ones_like().unwrap() * -1e4).unwrap());
    tensors.insert("quant_conv.weight".into(), CpuTensor::cat(&[&w, &zeros], 0).unwrap());
    tensors.insert("quant_conv.bias".into(), CpuTensor::cat(&[&b, &low], 0).unwrap());
}

#[test]
fn autoencoders_match_candle() {
    let ctx = context();
    for model in MODELS {
        let (cfg, cin, cout) = vae_config(&json(model, "vae"));
        assert!(cfg.use_quant_conv, "{}: the encoder check reads the mean through quant_conv", name(model));
        let latent_channels = cfg.latent_channels;
        let factor = 1 << (cfg.block_out_channels.len() - 1);
        let mut tensors = cpu_tensors(model, "vae");
        zero_variance(&mut tensors, latent_channels);
        let reference = AutoEncoderKL::new(var_builder(tensors), cin, cout, cfg).unwrap();
        let (src, our_cfg): (_, VaeConfig) = ours(model, "vae");
        let w = Weights::new(&ctx, &src, LoadPolicy::F32);
        let refs = fixture(model, "vae.safetensors");
        let ((z_shape, z), (x_shape, x)) = match &refs {
            Some(r) => (fixture_f32(r, "latent"), fixture_f32(r, "image")),
            None => {
                let mut rng = TorchRng::new(11);
                let z_shape = vec![1, latent_channels, 8, 12];
                let x_shape = vec![1, cin, 8 * factor, 12 * factor];
                let x = rng.randn(x_shape.iter().product()).iter().map(|v| v.clamp(-1.0, 1.0)).collect();
                ((z_shape.clone(), rng.randn(z_shape.iter().product())), (x_shape, x))
            }
        };
        let want = to_vec(&reference.decode(&cpu(&z_shape, &z)).unwrap());
        let got =
            download(&ctx, &Decoder::load(&w, &our_cfg).unwrap().forward(&ctx, &gpu(&ctx, &z_shape, &z)).unwrap());
        let decoded = refs.as_ref().map(|r| fixture_f32(r, "decoded").1);
        let d = report(&format!("{} vae decode", name(model)), &got, &want, decoded.as_deref());
        assert!(d.rel <= 1e-3, "{} decode: relative error {} > 1e-3 (worst {})", name(model), d.rel, d.worst);

        let want = to_vec(&reference.encode(&cpu(&x_shape, &x)).unwrap().sample().unwrap());
        let got =
            download(&ctx, &Encoder::load(&w, &our_cfg).unwrap().forward(&ctx, &gpu(&ctx, &x_shape, &x)).unwrap());
        let mean = refs.as_ref().map(|r| fixture_f32(r, "encoded_mean").1);
        let d = report(&format!("{} vae encode", name(model)), &got, &want, mean.as_deref());
        assert!(d.rel <= 1e-3, "{} encode: relative error {} > 1e-3 (worst {})", name(model), d.rel, d.worst);
    }
}
