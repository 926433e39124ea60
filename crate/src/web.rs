//! The wasm-bindgen surface (wasm32 only). Everything below it is plain Rust that also builds natively;
//! errors become JS `Error`s here and nowhere else.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::compose::{self, Axis};
use crate::convert::{Conversion, Format};
use crate::gpu::{DType, GpuContext, Tuning};
use crate::pipeline::{
    Adapters, Image, InitImage, MemorySource, ModelSource, Request, StableDiffusion, parameters_text_from,
};
use crate::preview::{PreviewFactors, TinyPreview};
use crate::selfcheck;
use crate::weights::LoadPolicy;
use crate::weights::embedding::Embedding;
use crate::weights::gguf::Gguf;
use crate::weights::lora::{self, Lora};
use crate::weights::{RangedSafetensors, TensorSource};

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// The threaded build's pool (pkg/threads/: wasm atomics, one memory shared by every thread). The model worker
/// starts n Web Workers on www/thread.js, each instantiates this module on the same memory and calls
/// [`run_thread`], which waits for a rayon thread to run; then [`build_thread_pool`] makes rayon's global pool
/// of n threads, handing each to a waiting worker. wasm-bindgen-rayon does the same, but starts its workers
/// from blob: URLs (without a bundler), which a page's `worker-src 'self'` refuses; its workers never start
/// and the first parallel loop waits forever. Here the workers are the page's own script.
#[cfg(target_feature = "atomics")]
mod thread_pool {
    use std::sync::OnceLock;

    use crossbeam_channel::{Receiver, Sender};
    use rayon::ThreadBuilder;
    use wasm_bindgen::prelude::*;

    fn channel() -> &'static (Sender<ThreadBuilder>, Receiver<ThreadBuilder>) {
        static CHANNEL: OnceLock<(Sender<ThreadBuilder>, Receiver<ThreadBuilder>)> = OnceLock::new();
        CHANNEL.get_or_init(crossbeam_channel::unbounded)
    }

    /// This module and its memory, for the workers to instantiate it on.
    #[wasm_bindgen(js_name = threadInit)]
    pub fn thread_init() -> js_sys::Object {
        let o = js_sys::Object::new();
        let _ = js_sys::Reflect::set(&o, &"module_or_path".into(), &wasm_bindgen::module());
        let _ = js_sys::Reflect::set(&o, &"memory".into(), &wasm_bindgen::memory());
        o
    }

    /// A worker's body: waits for one of rayon's threads and runs it (for good: rayon's threads never end).
    #[wasm_bindgen(js_name = runThread)]
    pub fn run_thread() {
        if let Ok(thread) = channel().1.recv() {
            thread.run();
        }
    }

    /// Makes rayon's global pool of `n` threads, run by the `n` workers waiting in [`run_thread`]. Must come
    /// before anything uses rayon (its first use makes a one-thread pool for good).
    #[wasm_bindgen(js_name = buildThreadPool)]
    pub fn build_thread_pool(n: usize) -> Result<(), JsError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .spawn_handler(|thread| channel().0.send(thread).map_err(|e| std::io::Error::other(e.to_string())))
            .build_global()
            .map_err(|e| JsError::new(&format!("starting the thread pool: {e}")))
    }
}

/// The threads the CPU path's kernels split over: rayon's pool (n after `initThreadPool(n)`), 1 in the
/// single-threaded build.
#[wasm_bindgen(js_name = cpuThreads)]
pub fn cpu_threads() -> usize {
    crate::ops::cpu_threads()
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: serde::Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(js_err)
}

/// The diagnostics page's handle on a WebGPU device: adapter facts and the kernel self-checks.
#[wasm_bindgen]
pub struct Diagnostics {
    ctx: GpuContext,
}

#[wasm_bindgen]
impl Diagnostics {
    /// Requests the adapter and device the way the generator does. Rejects with a readable message when the
    /// browser has no usable WebGPU.
    pub async fn create() -> Result<Diagnostics, JsError> {
        let ctx = GpuContext::new().await.map_err(js_err)?;
        Ok(Diagnostics { ctx })
    }

    /// The adapter, the limits the device was created with and the features enabled on it.
    pub fn adapter(&self) -> Result<JsValue, JsError> {
        to_js(self.ctx.summary())
    }

    /// Names of the kernel self-checks.
    #[wasm_bindgen(js_name = checkNames)]
    pub fn check_names() -> Vec<String> {
        selfcheck::CHECKS.iter().map(|s| s.to_string()).collect()
    }

    /// Times a UNet CFG step of `arch` ("sd15" or "sd-turbo") at `size` x `size` with random q4_0 weights
    /// made on the spot (no download; f16 activations where the GPU has shader-f16), widths divided by
    /// `narrow` (1: the real model). `on_progress(message)` is called as it goes. Resolves to the figures
    /// (unet_cfg_step_ms, load_s, unet_step_dispatches, peak_gpu_bytes, adapter ...).
    pub fn benchmark(&self, arch: String, size: u32, narrow: u32, on_progress: js_sys::Function) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let e = |er: crate::Error| JsValue::from(js_err(er));
            let arch: crate::bench::Arch = arch.parse().map_err(e)?;
            let act = if ctx.has_f16() { DType::F16 } else { DType::F32 };
            let policy = LoadPolicy { act, weights: DType::Q4_0 };
            let progress = |m: &str| {
                let _ = on_progress.call1(&JsValue::NULL, &m.into());
            };
            let r = crate::bench::bench_unet(&ctx, arch, narrow.max(1) as usize, size as usize, policy, 3, progress)
                .await
                .map_err(e)?;
            ctx.trim_pool();
            to_js(&r).map_err(JsValue::from)
        })
    }

    /// Names of the kernel variants [`Diagnostics::benchmark_variant`] compares, the defaults first.
    #[wasm_bindgen(js_name = variantNames)]
    pub fn variant_names() -> Vec<String> {
        Tuning::variants().into_iter().map(|(name, _)| name.to_string()).collect()
    }

    /// [`Diagnostics::benchmark`] with the kernel variant `variant` (one of `variantNames`), on this device:
    /// the same figures, to compare with the defaults' on the user's own GPU.
    #[wasm_bindgen(js_name = benchmarkVariant)]
    pub fn benchmark_variant(
        &self,
        arch: String,
        size: u32,
        narrow: u32,
        variant: String,
        on_progress: js_sys::Function,
    ) -> Result<js_sys::Promise, JsError> {
        let Some(tuning) = Tuning::named(&variant) else {
            return Err(JsError::new(&format!("no kernel variant named {variant:?}")));
        };
        Ok(Diagnostics { ctx: self.ctx.with_tuning(tuning) }.benchmark(arch, size, narrow, on_progress))
    }

    /// Times a UNet CFG step of `arch` on the CPU path (what runs without WebGPU: candle and our kernels in
    /// wasm, on the threads of the module it runs in) with random f32 weights made on the spot, widths divided
    /// by `narrow`; resolves to the same figures as [`Diagnostics::benchmark`]. Needs no WebGPU.
    #[wasm_bindgen(js_name = benchmarkCpu)]
    pub fn benchmark_cpu(arch: String, size: u32, narrow: u32, on_progress: js_sys::Function) -> js_sys::Promise {
        wasm_bindgen_futures::future_to_promise(async move {
            let e = |er: crate::Error| JsValue::from(js_err(er));
            let arch: crate::bench::Arch = arch.parse().map_err(e)?;
            let progress = |m: &str| {
                let _ = on_progress.call1(&JsValue::NULL, &m.into());
            };
            let ctx = GpuContext::cpu();
            let r = crate::bench::bench_unet(
                &ctx,
                arch,
                narrow.max(1) as usize,
                size as usize,
                LoadPolicy::F32,
                3,
                progress,
            )
            .await
            .map_err(e)?;
            to_js(&r).map_err(JsValue::from)
        })
    }

    /// Runs one self-check; resolves to an array of case reports (passed, max_abs_err, worst, ...).
    #[wasm_bindgen(js_name = runCheck)]
    pub fn run_check(&self, name: String) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let reports = selfcheck::run(&ctx, &name).await.map_err(|e| JsValue::from(js_err(e)))?;
            to_js(&reports).map_err(JsValue::from)
        })
    }
}

/// The generator as the page's worker drives it: a device (WebGPU, or the CPU fallback), a loaded model,
/// generation with a per-step callback that receives a small RGBA preview of the latent, and cancellation.
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<EngineInner>,
    reason: Option<String>,
}

struct EngineInner {
    ctx: GpuContext,
    model: RefCell<Option<Rc<StableDiffusion>>>,
    model_name: RefCell<String>,
    /// The loaded model's files and load policy, for loading its VAE encoder when img2img first asks.
    model_files: RefCell<Option<(js_sys::Map, LoadPolicy)>>,
    preview: RefCell<PreviewFactors>,
    /// The TAESD decoder for `preview: "taesd"` requests, once loaded.
    taesd: RefCell<Option<Rc<TinyPreview>>>,
    cancel: Cell<bool>,
    /// Imported LoRAs by name (read from the cache a tensor at a time when merged), in import order.
    loras: RefCell<Vec<Rc<Lora>>>,
    /// Imported textual-inversion embeddings, in import order (their rows follow the vocabulary in it).
    embeddings: RefCell<Vec<Rc<Embedding>>>,
    /// The LoRAs (name, scale) the loaded model has merged.
    active: RefCell<Vec<(String, f32)>>,
}

/// Reads byte ranges of a Blob synchronously (FileReaderSync: dedicated workers only).
fn blob_reader(blob: web_sys::Blob) -> crate::weights::RangeReader {
    std::rc::Rc::new(move |offset: u64, len: usize| {
        let fail = |e: JsValue| {
            crate::Error::Invalid(format!(
                "reading the model cache failed ({}); models load in a worker, where FileReaderSync exists",
                e.as_string()
                    .or_else(|| e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())))
                    .unwrap_or_default()
            ))
        };
        let reader = web_sys::FileReaderSync::new().map_err(fail)?;
        let part = blob.slice_with_f64_and_f64(offset as f64, (offset + len as u64) as f64).map_err(fail)?;
        let buf = reader.read_as_array_buffer(&part).map_err(fail)?;
        let bytes = js_sys::Uint8Array::new(&buf).to_vec();
        if bytes.len() != len {
            return Err(crate::Error::Invalid(format!(
                "the cache returned {} of {len} bytes at {offset}",
                bytes.len()
            )));
        }
        Ok(bytes)
    })
}

/// Resolves after a zero-delay `setTimeout`: one turn of the event loop.
async fn yield_now() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        let timer = js_sys::Reflect::get(&global, &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match timer {
            Some(set_timeout) => {
                let _ = set_timeout.call2(&global, &resolve, &0.into());
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// Sets a property on a plain JS object.
fn set(obj: &js_sys::Object, key: &str, value: impl Into<JsValue>) -> Result<(), JsError> {
    js_sys::Reflect::set(obj, &key.into(), &value.into()).map(|_| ()).map_err(|_| JsError::new("cannot set a property"))
}

fn image_to_js(img: &Image) -> Result<js_sys::Object, JsError> {
    let obj = js_sys::Object::new();
    set(&obj, "width", img.width as u32)?;
    set(&obj, "height", img.height as u32)?;
    set(&obj, "rgba", js_sys::Uint8ClampedArray::from(img.rgba.as_slice()))?;
    Ok(obj)
}

#[wasm_bindgen]
impl Engine {
    /// WebGPU when the browser offers it (unless `cpu` is true), otherwise the CPU fallback. A software
    /// adapter (the browser's fallback adapter, e.g. SwiftShader) runs a UNet step tens of times slower than
    /// the CPU path in wasm, so it is used only with `software_gpu` (tests of the WebGPU path); otherwise such
    /// an engine runs on the CPU and `fallbackReason()` says why. `variant`: a kernel variant's name
    /// (`Diagnostics.variantNames()`) the user kept on the diagnostics page for the adapter named
    /// `variant_adapter`; used when the device is on that adapter, else (or for a name this version does not
    /// know) the defaults.
    pub async fn create(
        cpu: bool,
        software_gpu: bool,
        variant_adapter: Option<String>,
        variant: Option<String>,
    ) -> Result<Engine, JsError> {
        let mut reason = None;
        let ctx = if cpu {
            GpuContext::cpu()
        } else {
            match GpuContext::new().await {
                Ok(ctx) if ctx.summary().device_type == "Cpu" && !software_gpu => {
                    reason = Some("software-adapter".to_string());
                    GpuContext::cpu()
                }
                Ok(ctx) => match variant.as_deref().and_then(Tuning::named) {
                    Some(tuning) if variant_adapter.as_deref() == Some(ctx.summary().name.as_str()) => {
                        ctx.with_tuning(tuning)
                    }
                    _ => ctx,
                },
                Err(crate::Error::NoAdapter(_)) => {
                    reason = Some("no-adapter".to_string());
                    GpuContext::cpu()
                }
                Err(e) => return Err(js_err(e)),
            }
        };
        let inner = EngineInner {
            ctx,
            model: Default::default(),
            model_name: Default::default(),
            model_files: Default::default(),
            preview: Default::default(),
            taesd: Default::default(),
            cancel: Default::default(),
            loras: Default::default(),
            embeddings: Default::default(),
            active: Default::default(),
        };
        Ok(Engine { inner: Rc::new(inner), reason })
    }

    /// Why the engine runs on the CPU although `cpu` was not asked: "software-adapter" (WebGPU is a software
    /// renderer here, slower than the CPU path) or "no-adapter"; undefined otherwise.
    #[wasm_bindgen(js_name = fallbackReason)]
    pub fn fallback_reason(&self) -> Option<String> {
        self.reason.clone()
    }

    /// The kernel variant the engine runs (see `create`), if not the defaults.
    #[wasm_bindgen(js_name = kernelVariant)]
    pub fn kernel_variant(&self) -> Option<String> {
        self.inner.ctx.summary().tuning.name().filter(|&n| n != "defaults").map(String::from)
    }

    /// The adapter (or "CPU (candle)") and its limits.
    pub fn adapter(&self) -> Result<JsValue, JsError> {
        to_js(self.inner.ctx.summary())
    }

    /// GPU memory held by tensors: `{live, peak}` bytes (the engine's pool counter), with `buffers` (GPU
    /// buffers created so far) and `bindGroups` (bind groups created so far); all 0 on the CPU fallback.
    #[wasm_bindgen(js_name = gpuMemory)]
    pub fn gpu_memory(&self) -> Result<JsValue, JsError> {
        let s = self.inner.ctx.pool_stats();
        let info = js_sys::Object::new();
        set(&info, "live", s.live_bytes as f64)?;
        set(&info, "peak", s.peak_bytes as f64)?;
        set(&info, "buffers", s.created as f64)?;
        set(&info, "bindGroups", self.inner.ctx.bind_groups_created() as f64)?;
        Ok(info.into())
    }

    /// Whether generation runs on the CPU fallback.
    #[wasm_bindgen(js_name = isCpu)]
    pub fn is_cpu(&self) -> bool {
        self.inner.ctx.is_cpu()
    }

    /// Loads a model from its files (see [`model_source`]; an optional `preview.json` sets the preview
    /// factors); `name` goes into the PNG parameters. `weights` ("f32", "f16", "q8_0" or "q4_0") is how linear
    /// and conv weights are held on the device (GGUF q8_0/q4_0 blocks stay as they are); anything but f32
    /// also runs activations in f16 where the adapter has shader-f16. Returns the model's defaults.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(&self, files: js_sys::Map, name: String, weights: String) -> Result<JsValue, JsError> {
        let weights = weight_type(&weights)?;
        let act = if weights != DType::F32 && self.inner.ctx.has_f16() { DType::F16 } else { DType::F32 };
        let src = model_source(&files)?;
        // The previous model's weights go back to the driver, not to the pool, before the next one loads.
        *self.inner.model.borrow_mut() = None;
        *self.inner.model_files.borrow_mut() = None;
        self.inner.ctx.trim_pool();
        let config: crate::models::clip::ClipConfig =
            crate::models::parse_config(&src.text("text_encoder/config.json").map_err(js_err)?, "text_encoder")
                .map_err(js_err)?;
        let (embeddings, _) = self.inner.fitting_embeddings(config.hidden_size);
        let refs: Vec<&Embedding> = embeddings.iter().map(|e| e.as_ref()).collect();
        let adapters = Adapters { loras: &[], embeddings: &refs };
        let sd = StableDiffusion::load_with(&self.inner.ctx, src.as_ref(), LoadPolicy { act, weights }, adapters)
            .map_err(js_err)?;
        let factors = match src.text("preview.json") {
            Ok(text) => PreviewFactors::from_json(&text).map_err(js_err)?,
            Err(_) => PreviewFactors::default(),
        };
        let info = js_sys::Object::new();
        set(&info, "defaultSize", sd.default_size() as u32)?;
        set(&info, "sizeMultiple", sd.size_multiple() as u32)?;
        set(&info, "lcm", sd.is_lcm())?;
        set(&info, "scheduler", sd.scheduler_config.default_kind().map(|k| k.name()).unwrap_or("ddim"))?;
        *self.inner.preview.borrow_mut() = factors;
        *self.inner.model_name.borrow_mut() = name;
        *self.inner.model.borrow_mut() = Some(Rc::new(sd));
        *self.inner.model_files.borrow_mut() = Some((files, LoadPolicy { act, weights }));
        self.inner.active.borrow_mut().clear();
        Ok(info.into())
    }

    /// Adds a LoRA or a textual-inversion embedding from its file (`name`: the file's name; `blob`: its bytes,
    /// in the cache): `.safetensors` with LoRA layers is a LoRA (read a tensor at a time when it is merged),
    /// anything else an embedding (A1111 `.safetensors` / `.pt`, diffusers' `learned_embeds`). One with the
    /// same name is replaced. Resolves to `{kind: "lora", name, format, layers, unknown}` or `{kind:
    /// "embedding", name (the trigger word), vectors, dim}`; a file that is neither, or one for another
    /// architecture, is refused with the reason. A new embedding is added to the loaded model at once, so the
    /// token meter counts its vectors.
    #[wasm_bindgen(js_name = addAdapter)]
    pub fn add_adapter(&self, name: String, blob: web_sys::Blob) -> Result<JsValue, JsError> {
        let size = blob.size() as u64;
        let stem =
            std::path::Path::new(&name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        let info = js_sys::Object::new();
        if lower.ends_with(".safetensors") {
            let file = RangedSafetensors::new(blob_reader(blob.clone()), size, name.clone()).map_err(js_err)?;
            let names = file.names();
            if names.iter().any(|n| n.starts_with("lora_") || n.contains(".lora_") || n.contains("hada_w")) {
                let metadata = file.metadata_value(lora::ADAPTER_METADATA);
                let l = Lora::new(stem.clone(), Box::new(file), metadata.as_deref()).map_err(js_err)?;
                set(&info, "kind", "lora")?;
                set(&info, "name", l.name.clone())?;
                set(&info, "format", format!("{:?}", l.format).to_lowercase())?;
                set(&info, "layers", l.layers.len() as u32)?;
                set(&info, "unknown", l.unknown.len() as u32)?;
                let mut loras = self.inner.loras.borrow_mut();
                loras.retain(|x| x.name != l.name);
                loras.push(Rc::new(l));
                return Ok(info.into());
            }
        }
        let bytes = blob_reader(blob)(0, size as usize).map_err(js_err)?;
        let e = Embedding::from_bytes(&name, bytes).map_err(js_err)?;
        set(&info, "kind", "embedding")?;
        set(&info, "name", e.trigger.clone())?;
        set(&info, "vectors", e.vectors() as u32)?;
        set(&info, "dim", e.dim as u32)?;
        {
            let mut embeddings = self.inner.embeddings.borrow_mut();
            embeddings.retain(|x| x.trigger != e.trigger);
            embeddings.push(Rc::new(e));
        }
        self.inner.reapply()?;
        Ok(info.into())
    }

    /// Forgets the LoRA or embedding called `name` (a LoRA's name or an embedding's trigger word); the loaded
    /// model drops it at its next generation (an embedding at once).
    #[wasm_bindgen(js_name = removeAdapter)]
    pub fn remove_adapter(&self, name: String) -> Result<(), JsError> {
        self.inner.loras.borrow_mut().retain(|l| l.name != name);
        let before = self.inner.embeddings.borrow().len();
        self.inner.embeddings.borrow_mut().retain(|e| e.trigger != name);
        if self.inner.embeddings.borrow().len() != before {
            self.inner.reapply()?;
        }
        Ok(())
    }

    /// Loads the TAESD decoder that `preview: "taesd"` requests use, from a diffusers AutoencoderTiny folder's
    /// files (`config.json`, `diffusion_pytorch_model.safetensors`) as `loadModel` takes them.
    #[wasm_bindgen(js_name = loadPreviewDecoder)]
    pub fn load_preview_decoder(&self, files: js_sys::Map) -> Result<(), JsError> {
        let (src, _) = file_source(&files, false)?;
        let act = if self.inner.ctx.has_f16() { DType::F16 } else { DType::F32 };
        let taesd = TinyPreview::load(&self.inner.ctx, &src, act).map_err(js_err)?;
        *self.inner.taesd.borrow_mut() = Some(Rc::new(taesd));
        Ok(())
    }

    /// Generates `request` ({prompt, negative_prompt, seed, steps, guidance, width, height, scheduler,
    /// preview}; preview: "latent" (the default: the latent projected to RGB at latent resolution) or "taesd"
    /// (decoded by TAESD at full resolution; `loadPreviewDecoder` first)).
    /// img2img: `init_images: [{width, height, rgba, weight}]` (RGBA pixels at any size, resized here to the
    /// request's; `weight` blends several, default 1) with `strength` in (0, 1]; the VAE encoder is loaded
    /// from the model's files the first time.
    /// Interpolation: `interpolate: {t, seed, prompt, negative_prompt}` makes frame `t` (0 to 1) of the walk
    /// from this request toward the one with those fields replaced (`StableDiffusion::start_between`).
    /// `on_step({index, steps, timestep, preview: {width, height, rgba}})` runs after every step. Resolves to
    /// `{width, height, rgba, parameters, png}` (`png`: the image with `parameters` embedded, as the CLI
    /// writes it); rejects with "cancelled" after `cancel()`.
    pub fn generate(&self, request: JsValue, on_step: js_sys::Function) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let e = |e: JsError| JsValue::from(e);
            let mode = js_sys::Reflect::get(&request, &"preview".into()).ok().and_then(|v| v.as_string());
            let taesd = match mode.as_deref() {
                None | Some("" | "latent") => None,
                Some("taesd") => Some(inner.taesd.borrow().clone().ok_or_else(|| {
                    e(JsError::new("the TAESD preview decoder is not loaded (Engine.loadPreviewDecoder)"))
                })?),
                Some(other) => {
                    return Err(e(JsError::new(&format!("unknown preview \"{other}\": use \"latent\" or \"taesd\""))));
                }
            };
            let init = init_images(&request).map_err(e)?;
            let toward = js_sys::Reflect::get(&request, &"interpolate".into()).unwrap_or(JsValue::UNDEFINED);
            let chosen = request_loras(&request).map_err(e)?;
            let mut req: Request =
                serde_wasm_bindgen::from_value(request).map_err(|er| e(JsError::new(&format!("bad request: {er}"))))?;
            // LoRAs: the request's `loras`, then the prompt's tags (a tag overrides the same name's scale). The
            // request's become tags in the prompt too, so the PNG's parameters name them as A1111 does.
            let mut wanted = chosen.clone();
            for (name, scale) in crate::prompt::lora_tags(&req.prompt).1 {
                wanted.retain(|(n, _)| *n != name);
                wanted.push((name, scale));
            }
            for (name, scale) in &chosen {
                req.prompt.push_str(&format!(" <lora:{name}:{scale}>"));
            }
            let warnings = inner.apply_loras(&wanted).map_err(e)?;
            let toward = interpolation(&req, &toward).map_err(e)?;
            if toward.is_some() && !init.is_empty() {
                return Err(e(JsError::new("a request cannot both interpolate and start from init images")));
            }
            if !init.is_empty() {
                inner.load_vae_encoder().map_err(e)?;
            }
            let sd = inner.model.borrow().clone().ok_or_else(|| e(JsError::new("no model is loaded")))?;
            let (w, h) = sd.size(&req).map_err(|er| e(js_err(er)))?;
            let init: Vec<InitImage> =
                init.into_iter().map(|(image, weight)| InitImage { image: image.resized(w, h), weight }).collect();
            let factors = inner.preview.borrow().clone();
            inner.cancel.set(false);
            let kind = sd.scheduler_kind(&req).map_err(|er| e(js_err(er)))?;
            let mut run = match &toward {
                Some((b, t)) => sd.start_between(&req, b, *t),
                None => sd.start_from(&req, &init).await,
            }
            .map_err(|er| e(js_err(er)))?;
            while let Some(step) = run.step().await.map_err(|er| e(js_err(er)))? {
                let event = js_sys::Object::new();
                set(&event, "index", step.index as u32).map_err(e)?;
                set(&event, "steps", step.steps as u32).map_err(e)?;
                set(&event, "timestep", step.timestep).map_err(e)?;
                let preview = match &taesd {
                    Some(t) => t.preview(&inner.ctx, step.latents).await,
                    None => crate::preview::preview(&inner.ctx, step.latents, &factors).await,
                }
                .map_err(|er| e(js_err(er)))?;
                set(&event, "preview", image_to_js(&preview).map_err(e)?).map_err(e)?;
                on_step.call1(&JsValue::NULL, &event)?;
                // Lets the worker's event loop run, so a "cancel" message is seen between steps even when a
                // step completes synchronously (the CPU fallback).
                yield_now().await;
                if inner.cancel.get() {
                    return Err(e(js_err(crate::Error::Cancelled)));
                }
            }
            let image = sd.decode(run.latents()).await.map_err(|er| e(js_err(er)))?;
            let name = inner.model_name.borrow().clone();
            let mut parameters =
                parameters_text_from(&req, kind.name(), image.width, image.height, &name, !init.is_empty());
            if let Some((b, t)) = &toward {
                parameters.push_str(&format!(
                    "\nInterpolation: t={t} to seed {}, prompt: {}, negative prompt: {}",
                    b.seed, b.prompt, b.negative_prompt
                ));
            }
            let png = image.to_png(&parameters).map_err(|er| e(js_err(er)))?;
            let out = image_to_js(&image).map_err(e)?;
            set(&out, "parameters", parameters).map_err(e)?;
            let list = js_sys::Array::new();
            for w in warnings {
                list.push(&w.into());
            }
            set(&out, "warnings", list).map_err(e)?;
            set(&out, "png", js_sys::Uint8Array::from(png.as_slice())).map_err(e)?;
            Ok(out.into())
        })
    }

    /// The loaded model's token count of a prompt (A1111's weighting syntax unless `literal`):
    /// `{tokens, limit, cutOff}`, `cutOff` the words past the limit (absent when it fits).
    #[wasm_bindgen(js_name = countTokens)]
    pub fn count_tokens(&self, prompt: String, literal: bool) -> Result<JsValue, JsError> {
        let sd = self.inner.model.borrow().clone().ok_or_else(|| JsError::new("no model is loaded"))?;
        let (tokens, cut) = sd.tokenizer.measure(&prompt, !literal).map_err(js_err)?;
        let info = js_sys::Object::new();
        set(&info, "tokens", tokens as u32)?;
        set(&info, "limit", sd.tokenizer.limit() as u32)?;
        if let Some(words) = cut {
            set(&info, "cutOff", words)?;
        }
        Ok(info.into())
    }

    /// Stops the running generation after its current step.
    pub fn cancel(&self) {
        self.inner.cancel.set(true);
    }

    /// Why the GPU device was lost, or undefined while it works: once lost, this engine is done and a new one
    /// (with the model loaded again) is needed.
    #[wasm_bindgen(js_name = deviceLost)]
    pub fn device_lost(&self) -> Option<String> {
        self.inner.ctx.device_lost()
    }

    /// Destroys the GPU device, as a driver reset or a GPU-process crash would lose it: for testing what
    /// the page and the element do then.
    #[wasm_bindgen(js_name = loseDevice)]
    pub fn lose_device(&self) {
        self.inner.ctx.destroy_device();
    }
}

impl EngineInner {
    /// Merges the LoRAs `wanted` (name, scale) and the imported embeddings into the loaded model, re-merging
    /// what changed since the last time (nothing when nothing did). Returns the warnings about them.
    fn apply_loras(&self, wanted: &[(String, f32)]) -> Result<Vec<String>, JsError> {
        let chosen: Vec<(Rc<Lora>, f32)> = {
            let loras = self.loras.borrow();
            wanted
                .iter()
                .map(|(name, scale)| {
                    let l = loras.iter().find(|l| l.name == *name).ok_or_else(|| {
                        JsError::new(&format!(
                            "no LoRA named \"{name}\" is imported: import its file in the models panel (imported: {})",
                            if loras.is_empty() {
                                "none".into()
                            } else {
                                loras.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                            }
                        ))
                    })?;
                    Ok((l.clone(), *scale))
                })
                .collect::<Result<_, JsError>>()?
        };
        let mut slot = self.model.borrow_mut();
        let Some(rc) = slot.as_mut() else { return Ok(Vec::new()) };
        let (embeddings, mut warnings) = self.fitting_embeddings(rc.text_encoder.config.hidden_size);
        let loras: Vec<(&Lora, f32)> = chosen.iter().map(|(l, s)| (l.as_ref(), *s)).collect();
        let refs: Vec<&Embedding> = embeddings.iter().map(|e| e.as_ref()).collect();
        let sd = Rc::get_mut(rc).ok_or_else(|| JsError::new("the model is busy: wait for the generation to end"))?;
        let files = self.model_files.borrow();
        let (files, policy) = files.as_ref().ok_or_else(|| JsError::new("no model is loaded"))?;
        let src = model_source(files)?;
        let adapters = Adapters { loras: &loras, embeddings: &refs };
        sd.apply_adapters(src.as_ref(), *policy, adapters).map_err(js_err)?;
        *self.active.borrow_mut() = wanted.to_vec();
        warnings.extend(sd.adapter_warnings.iter().cloned());
        Ok(warnings)
    }

    /// The imported embeddings whose vectors fit a text encoder `width` wide, and a note for each that does
    /// not (an SD 2.x embedding while an SD 1.x model is loaded is kept for later, not an error).
    fn fitting_embeddings(&self, width: usize) -> (Vec<Rc<Embedding>>, Vec<String>) {
        let (fit, other): (Vec<Rc<Embedding>>, Vec<Rc<Embedding>>) =
            self.embeddings.borrow().iter().cloned().partition(|e| e.check_width(width).is_ok());
        let notes = other
            .iter()
            .map(|e| {
                format!("the embedding {} is {} wide, this model's text encoder {width}: not used", e.trigger, e.dim)
            })
            .collect();
        (fit, notes)
    }

    /// Re-applies the last LoRA set with the current embeddings (after an embedding was added or removed).
    fn reapply(&self) -> Result<(), JsError> {
        let active = self.active.borrow().clone();
        // A LoRA removed since is dropped rather than failing.
        let names: Vec<String> = self.loras.borrow().iter().map(|l| l.name.clone()).collect();
        let active: Vec<(String, f32)> = active.into_iter().filter(|(n, _)| names.contains(n)).collect();
        self.apply_loras(&active).map(|_| ())
    }

    /// Loads the current model's VAE encoder (img2img) unless it is loaded.
    fn load_vae_encoder(&self) -> Result<(), JsError> {
        let mut slot = self.model.borrow_mut();
        let rc = slot.as_mut().ok_or_else(|| JsError::new("no model is loaded"))?;
        if rc.vae_encoder.is_some() {
            return Ok(());
        }
        let sd = Rc::get_mut(rc).ok_or_else(|| JsError::new("the model is busy: wait for the generation to end"))?;
        let files = self.model_files.borrow();
        let (files, policy) = files.as_ref().ok_or_else(|| JsError::new("no model is loaded"))?;
        let src = model_source(files)?;
        sd.load_vae_encoder(src.as_ref(), *policy).map_err(js_err)
    }
}

/// A request's `interpolate: {t, seed, prompt, negative_prompt}`: the far end (the request with those
/// fields replaced) and the frame's position `t` in [0, 1].
fn interpolation(req: &Request, value: &JsValue) -> Result<Option<(Request, f32)>, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    let get = |k: &str| js_sys::Reflect::get(value, &k.into()).unwrap_or(JsValue::UNDEFINED);
    let t = get("t").as_f64().ok_or_else(|| JsError::new("interpolate needs t, the frame's place from 0 to 1"))?;
    let mut b = req.clone();
    if let Some(seed) = get("seed").as_f64() {
        if !(seed >= 0.0 && seed.fract() == 0.0) {
            return Err(JsError::new(&format!("interpolate: seed {seed} is not a whole number >= 0")));
        }
        b.seed = seed as u64;
    }
    if let Some(p) = get("prompt").as_string() {
        b.prompt = p;
    }
    if let Some(p) = get("negative_prompt").as_string() {
        b.negative_prompt = p;
    }
    Ok(Some((b, t as f32)))
}

/// A request's `loras: [{name, scale}]` (scale 1 when absent).
fn request_loras(request: &JsValue) -> Result<Vec<(String, f32)>, JsError> {
    let list = js_sys::Reflect::get(request, &"loras".into()).unwrap_or(JsValue::UNDEFINED);
    if list.is_undefined() || list.is_null() {
        return Ok(Vec::new());
    }
    let list: js_sys::Array = list.dyn_into().map_err(|_| JsError::new("loras must be an array of {name, scale}"))?;
    list.iter()
        .map(|item| {
            let get = |k: &str| js_sys::Reflect::get(&item, &k.into()).unwrap_or(JsValue::UNDEFINED);
            let name = get("name").as_string().ok_or_else(|| JsError::new("each of loras needs a name"))?;
            let scale = get("scale");
            let scale = if scale.is_undefined() { 1.0 } else { scale.as_f64().unwrap_or(f64::NAN) };
            if !scale.is_finite() {
                return Err(JsError::new(&format!("the LoRA {name}'s scale must be a number")));
            }
            Ok((name, scale as f32))
        })
        .collect()
}

/// A request's `init_images`: `[{width, height, rgba, weight}]`, each checked for size.
fn init_images(request: &JsValue) -> Result<Vec<(Image, f32)>, JsError> {
    let list = js_sys::Reflect::get(request, &"init_images".into()).unwrap_or(JsValue::UNDEFINED);
    if list.is_undefined() || list.is_null() {
        return Ok(Vec::new());
    }
    let list: js_sys::Array = list.dyn_into().map_err(|_| JsError::new("init_images must be an array"))?;
    list.iter()
        .enumerate()
        .map(|(n, item)| {
            let weight = js_sys::Reflect::get(&item, &"weight".into()).ok().and_then(|w| w.as_f64()).unwrap_or(1.0);
            Ok((image_from_js(&item, &format!("init image {}", n + 1))?, weight as f32))
        })
        .collect()
}

/// `{width, height, rgba}` (RGBA pixels in a Uint8Array or Uint8ClampedArray) as an image; `what` names it in
/// errors.
fn image_from_js(item: &JsValue, what: &str) -> Result<Image, JsError> {
    let get = |k: &str| js_sys::Reflect::get(item, &k.into()).unwrap_or(JsValue::UNDEFINED);
    let bad = |e: &str| JsError::new(&format!("{what}: {e}"));
    let width = get("width").as_f64().ok_or_else(|| bad("needs width"))? as usize;
    let height = get("height").as_f64().ok_or_else(|| bad("needs height"))? as usize;
    let rgba = get("rgba");
    if !(rgba.is_instance_of::<js_sys::Uint8Array>() || rgba.is_instance_of::<js_sys::Uint8ClampedArray>()) {
        return Err(bad("rgba must be a Uint8Array or Uint8ClampedArray"));
    }
    let rgba = js_sys::Uint8Array::new(&rgba).to_vec();
    if width == 0 || height == 0 || width > 16384 || height > 16384 || rgba.len() != width * height * 4 {
        return Err(bad(&format!("{} bytes are not {width}x{height} RGBA pixels", rgba.len())));
    }
    Ok(Image { width, height, rgba })
}

/// Images from a JS array of `{width, height, rgba}`.
fn images_from_js(list: &js_sys::Array, what: &str) -> Result<Vec<Image>, JsError> {
    list.iter().enumerate().map(|(n, item)| image_from_js(&item, &format!("{what} {}", n + 1))).collect()
}

/// The requests of a sweep's cells (the CLI's `grid`): `base` (a generate request) with axis `x`
/// (`KEY=V1,V2,...`: seed, guidance, steps, scheduler, strength, subseed-strength, or prompt search and
/// replace) and optionally `y`, row by row; each is `base` with the axes' fields replaced. A bad axis or value
/// is refused before any work.
#[wasm_bindgen(js_name = gridRequests)]
pub fn grid_requests(base: JsValue, x: String, y: Option<String>) -> Result<js_sys::Array, JsError> {
    let (x, y) = axes(&x, y.as_deref())?;
    let req: Request = serde_wasm_bindgen::from_value(base.clone()).map_err(|e| js_err(format!("bad request: {e}")))?;
    let out = js_sys::Array::new();
    for cell in compose::grid_requests(&req, &x, y.as_ref()).map_err(js_err)? {
        let obj = js_sys::Object::assign(&js_sys::Object::new(), base.unchecked_ref());
        let fields = to_js(&cell)?;
        for key in ["seed", "guidance", "steps", "scheduler", "strength", "subseed_strength", "prompt"] {
            let v = js_sys::Reflect::get(&fields, &key.into()).unwrap_or(JsValue::UNDEFINED);
            if !v.is_undefined() && !v.is_null() {
                set(&obj, key, v)?;
            }
        }
        out.push(&obj);
    }
    Ok(out)
}

/// A sweep's axes: `x`, and `y` unless absent or blank.
fn axes(x: &str, y: Option<&str>) -> Result<(Axis, Option<Axis>), JsError> {
    let x = Axis::parse(x).map_err(js_err)?;
    Ok((x, y.filter(|y| !y.trim().is_empty()).map(Axis::parse).transpose().map_err(js_err)?))
}

/// A sweep's grid as PNG bytes: `cells` (`{width, height, rgba}`, in `gridRequests`' order) labelled with the
/// axes' values, `parameters` in its text chunk (the axes appended).
#[wasm_bindgen(js_name = gridPng)]
pub fn grid_png(cells: js_sys::Array, x: String, y: Option<String>, parameters: String) -> Result<Vec<u8>, JsError> {
    let (x, y) = axes(&x, y.as_deref())?;
    let grid = compose::grid_image(&images_from_js(&cells, "cell")?, &x, y.as_ref()).map_err(js_err)?;
    let mut parameters = format!("{parameters}\nGrid: x {}", x.describe());
    if let Some(a) = &y {
        parameters.push_str(&format!("; y {}", a.describe()));
    }
    grid.to_png(&parameters).map_err(js_err)
}

/// An interpolation's frames (`{width, height, rgba}`) side by side as PNG bytes, `parameters` in its text chunk.
#[wasm_bindgen(js_name = stripPng)]
pub fn strip_png(frames: js_sys::Array, parameters: String) -> Result<Vec<u8>, JsError> {
    compose::strip(&images_from_js(&frames, "frame")?).and_then(|s| s.to_png(&parameters)).map_err(js_err)
}

/// An interpolation's frames as a looping GIF (forth and back), `frame_ms` per frame.
#[wasm_bindgen(js_name = animationGif)]
pub fn animation_gif(frames: js_sys::Array, frame_ms: u16) -> Result<Vec<u8>, JsError> {
    compose::gif(&images_from_js(&frames, "frame")?, frame_ms).map_err(js_err)
}

/// A weight type's name as the page says it ("f32", "f16", "q8_0", "q4_0"; "" is f32).
fn weight_type(name: &str) -> Result<DType, JsError> {
    Ok(match name {
        "f32" | "" => DType::F32,
        "f16" => DType::F16,
        "q8_0" => DType::Q8_0,
        "q4_0" => DType::Q4_0,
        other => return Err(JsError::new(&format!("unknown weight type \"{other}\": use f32, f16, q8_0 or q4_0"))),
    })
}

/// The model in `files`: a `Map` from diffusers-layout paths (`unet/config.json`, ...) to `Uint8Array`s or
/// `Blob`s, or holding one single-file checkpoint at the top level (`model.safetensors` with the original SD
/// names, or a stable-diffusion.cpp `.gguf`; configs in the map override those read off its tensors). In a
/// worker, `.safetensors` and `.gguf` Blobs are read a tensor (or a block of rows) at a time with
/// FileReaderSync, so weights are never whole in memory.
fn model_source(files: &js_sys::Map) -> Result<Box<dyn ModelSource>, JsError> {
    let (src, single) = file_source(files, true)?;
    let Some((path, blob)) = single.filter(|_| !src.exists("unet/config.json")) else {
        return Ok(Box::new(src));
    };
    let (size, read) = (blob.size() as u64, blob_reader(blob));
    let ck = if path.ends_with(".gguf") {
        let file = Gguf::ranged(read, size, path).map_err(js_err)?;
        let embedded = file.embedded_files();
        Checkpoint::new(Box::new(file), Some(Box::new(src))).map_err(js_err)?.with_embedded(embedded)
    } else {
        let file = RangedSafetensors::new(read, size, path).map_err(js_err)?;
        let embedded = file.embedded_files();
        Checkpoint::new(Box::new(file), Some(Box::new(src))).map_err(js_err)?.with_embedded(embedded)
    };
    Ok(Box::new(ck))
}

/// The files of `files` as a [`MemorySource`] (`.safetensors` Blobs read in ranges), and, with `checkpoints`,
/// the one top-level checkpoint file (`.safetensors` or `.gguf`) set apart.
fn file_source(
    files: &js_sys::Map,
    checkpoints: bool,
) -> Result<(MemorySource, Option<(String, web_sys::Blob)>), JsError> {
    let mut src = MemorySource::new();
    let mut failure = None;
    // One checkpoint file at the top level: a single-file model.
    let mut single = None;
    files.for_each(&mut |value, key| {
        if failure.is_some() {
            return;
        }
        let Some(path) = key.as_string() else {
            failure = Some("model file names must be strings".to_string());
            return;
        };
        let top = checkpoints && !path.contains('/') && (path.ends_with(".safetensors") || path.ends_with(".gguf"));
        match value.dyn_into::<web_sys::Blob>() {
            Ok(blob) if top => single = Some((path, blob)),
            // Weights stay in the cache: read one tensor at a time.
            Ok(blob) if path.ends_with(".safetensors") => {
                let size = blob.size() as u64;
                src.insert_ranged(path, size, blob_reader(blob));
            }
            Ok(blob) => match blob_reader(blob.clone())(0, blob.size() as usize) {
                Ok(bytes) => src.insert(path, bytes),
                Err(e) => failure = Some(e.to_string()),
            },
            Err(value) => src.insert(path, js_sys::Uint8Array::new(&value).to_vec()),
        }
    });
    if let Some(msg) = failure {
        return Err(JsError::new(&msg));
    }
    Ok((src, single))
}

/// Converts a model (as `Engine.loadModel` takes it) into one GGUF file with quantized weights, a few tensors
/// per `step`, so the worker can report progress and cancel between steps: how the page keeps a downloaded
/// f16 model as q4_0 or q8_0. Convolutions are quantized too (as `latent-gen convert --quantize-convs`: the
/// file is for us; stable-diffusion.cpp keeps them f16).
#[wasm_bindgen]
pub struct Converter {
    src: Box<dyn ModelSource>,
    conversion: Conversion,
    /// Tensors written; `None` before the header.
    next: Option<usize>,
}

#[wasm_bindgen]
impl Converter {
    /// Plans the conversion of `files` to `weights` ("q8_0", "q4_0" or "f16"); reads only headers.
    #[wasm_bindgen(constructor)]
    pub fn new(files: js_sys::Map, weights: String) -> Result<Converter, JsError> {
        let src = model_source(&files)?;
        let dtype = weight_type(&weights)?;
        let conversion = Conversion::new(src.as_ref(), Format::Gguf, dtype, dtype.is_quantized()).map_err(js_err)?;
        Ok(Converter { src, conversion, next: None })
    }

    /// The size of the finished file in bytes.
    pub fn bytes(&self) -> f64 {
        self.conversion.report().bytes as f64
    }

    /// Tensors in the file.
    pub fn tensors(&self) -> usize {
        self.conversion.len()
    }

    /// Tensors written so far.
    pub fn done(&self) -> usize {
        self.next.unwrap_or(0)
    }

    /// Writes the file's next bytes, in order, through `write(Uint8Array)` (which must store them all or
    /// throw): the header on the first call, then whole tensors until about `budget` bytes went out. Returns
    /// whether anything is left.
    pub fn step(&mut self, budget: f64, write: &js_sys::Function) -> Result<bool, JsError> {
        let mut sink = |bytes: &[u8]| -> crate::Result<()> {
            write.call1(&JsValue::NULL, &js_sys::Uint8Array::from(bytes)).map(|_| ()).map_err(|e| {
                let msg = e
                    .dyn_ref::<js_sys::Error>()
                    .map(|e| String::from(e.message()))
                    .or_else(|| e.as_string())
                    .unwrap_or_else(|| "the write failed".into());
                crate::Error::Invalid(msg)
            })
        };
        let Some(mut k) = self.next else {
            sink(&self.conversion.header().map_err(js_err)?).map_err(js_err)?;
            self.next = Some(0);
            return Ok(!self.conversion.is_empty());
        };
        let sources = self.conversion.open(self.src.as_ref()).map_err(js_err)?;
        let mut sent = 0.0;
        while k < self.conversion.len() && sent < budget {
            sent += self.conversion.write_tensor(&sources, k, &mut sink).map_err(js_err)? as f64;
            k += 1;
        }
        self.next = Some(k);
        Ok(k < self.conversion.len())
    }
}

/// Incremental SHA-256 (the sha2 crate), for verifying multi-gigabyte downloads chunk by chunk: WebCrypto's
/// `digest` only hashes a whole buffer at once.
#[wasm_bindgen]
#[derive(Default)]
pub struct Sha256(sha2::Sha256);

#[wasm_bindgen]
impl Sha256 {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Sha256 {
        Sha256::default()
    }

    /// Hashes the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        sha2::Digest::update(&mut self.0, data);
    }

    /// The lowercase hex digest of everything so far; starts over afterwards.
    pub fn hex(&mut self) -> String {
        let digest = sha2::Digest::finalize_reset(&mut self.0);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}
