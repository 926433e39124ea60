//! The wasm-bindgen surface (wasm32 only). Everything below it is plain Rust that also builds natively;
//! errors become JS `Error`s here and nowhere else.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::gpu::{DType, GpuContext};
use crate::pipeline::{Image, MemorySource, ModelSource, Request, StableDiffusion, parameters_text};
use crate::preview::PreviewFactors;
use crate::selfcheck;
use crate::weights::LoadPolicy;
use crate::weights::RangedSafetensors;
use crate::weights::gguf::Gguf;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
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
}

struct EngineInner {
    ctx: GpuContext,
    model: RefCell<Option<Rc<StableDiffusion>>>,
    model_name: RefCell<String>,
    preview: RefCell<PreviewFactors>,
    cancel: Cell<bool>,
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
    /// WebGPU when the browser offers it (unless `cpu` is true), otherwise the CPU fallback.
    pub async fn create(cpu: bool) -> Result<Engine, JsError> {
        let ctx = if cpu {
            GpuContext::cpu()
        } else {
            match GpuContext::new().await {
                Ok(ctx) => ctx,
                Err(crate::Error::NoAdapter(_)) => GpuContext::cpu(),
                Err(e) => return Err(js_err(e)),
            }
        };
        let inner = EngineInner {
            ctx,
            model: Default::default(),
            model_name: Default::default(),
            preview: Default::default(),
            cancel: Default::default(),
        };
        Ok(Engine { inner: Rc::new(inner) })
    }

    /// The adapter (or "CPU (candle)") and its limits.
    pub fn adapter(&self) -> Result<JsValue, JsError> {
        to_js(self.inner.ctx.summary())
    }

    /// GPU memory held by tensors: `{live, peak}` bytes (the engine's pool counter; 0 on the CPU fallback).
    #[wasm_bindgen(js_name = gpuMemory)]
    pub fn gpu_memory(&self) -> Result<JsValue, JsError> {
        let s = self.inner.ctx.pool_stats();
        let info = js_sys::Object::new();
        set(&info, "live", s.live_bytes as f64)?;
        set(&info, "peak", s.peak_bytes as f64)?;
        Ok(info.into())
    }

    /// Whether generation runs on the CPU fallback.
    #[wasm_bindgen(js_name = isCpu)]
    pub fn is_cpu(&self) -> bool {
        self.inner.ctx.is_cpu()
    }

    /// Loads a model from its files: a `Map` from diffusers-layout paths (`unet/config.json`, ...), or from
    /// the name of one single-file checkpoint (`model.safetensors` with the original SD names, or a
    /// stable-diffusion.cpp `.gguf`; configs in the map override those read off its tensors), to
    /// `Uint8Array`s or `Blob`s (in a worker, `.safetensors` Blobs are read one tensor at a time with
    /// FileReaderSync, so weights go from the cache to the GPU without ever being whole in memory) (an optional `preview.json` sets the preview factors); `name` goes into the PNG
    /// parameters. `weights` ("f32", "f16", "q8_0" or "q4_0") is how linear and conv weights are held on the
    /// device; anything but f32 also runs activations in f16 where the adapter has shader-f16. Returns the
    /// model's defaults.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(&self, files: js_sys::Map, name: String, weights: String) -> Result<JsValue, JsError> {
        let weights = match weights.as_str() {
            "f32" | "" => DType::F32,
            "f16" => DType::F16,
            "q8_0" => DType::Q8_0,
            "q4_0" => DType::Q4_0,
            other => return Err(JsError::new(&format!("unknown weight type \"{other}\": use f32, f16, q8_0 or q4_0"))),
        };
        let act = if weights != DType::F32 && self.inner.ctx.has_f16() { DType::F16 } else { DType::F32 };
        let mut src = MemorySource::new();
        let mut failure = None;
        files.for_each(&mut |value, key| {
            if failure.is_some() {
                return;
            }
            let Some(path) = key.as_string() else {
                failure = Some("model file names must be strings".to_string());
                return;
            };
            match value.dyn_into::<web_sys::Blob>() {
                // Weights stay in the cache: read one tensor at a time.
                Ok(blob) if path.ends_with(".safetensors") => {
                    let size = blob.size() as u64;
                    src.insert_ranged(path, size, blob_reader(blob));
                }
                // A single-file GGUF model, read below.
                Ok(_) if path.ends_with(".gguf") => {}
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
        // One checkpoint file at the top level (no unet/ folder): a single-file model, its configs read off
        // its tensors unless the map has them.
        let mut single = None;
        files.for_each(&mut |value, key| {
            let path = key.as_string().unwrap_or_default();
            let top = !path.contains('/') && (path.ends_with(".safetensors") || path.ends_with(".gguf"));
            if let (true, Ok(blob)) = (top, value.dyn_into::<web_sys::Blob>()) {
                single = Some((path, blob));
            }
        });
        let policy = LoadPolicy { act, weights };
        let sd = match single.filter(|_| !src.exists("unet/config.json")) {
            Some((path, blob)) => {
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
                let sd = StableDiffusion::load(&self.inner.ctx, &ck, policy).map_err(js_err)?;
                src = MemorySource::new();
                if let Ok(text) = ck.text("preview.json") {
                    src.insert("preview.json", text.into_bytes());
                }
                sd
            }
            None => StableDiffusion::load(&self.inner.ctx, &src, policy).map_err(js_err)?,
        };
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
        Ok(info.into())
    }

    /// Generates `request` ({prompt, negative_prompt, seed, steps, guidance, width, height, scheduler}).
    /// `on_step({index, steps, timestep, preview: {width, height, rgba}})` runs after every step. Resolves to
    /// `{width, height, rgba, parameters, png}` (`png`: the image with `parameters` embedded, as the CLI
    /// writes it); rejects with "cancelled" after `cancel()`.
    pub fn generate(&self, request: JsValue, on_step: js_sys::Function) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let e = |e: JsError| JsValue::from(e);
            let req: Request =
                serde_wasm_bindgen::from_value(request).map_err(|er| e(JsError::new(&format!("bad request: {er}"))))?;
            let sd = inner.model.borrow().clone().ok_or_else(|| e(JsError::new("no model is loaded")))?;
            let factors = inner.preview.borrow().clone();
            inner.cancel.set(false);
            let kind = sd.scheduler_kind(&req).map_err(|er| e(js_err(er)))?;
            let mut run = sd.start(&req).map_err(|er| e(js_err(er)))?;
            while let Some(step) = run.step().await.map_err(|er| e(js_err(er)))? {
                let event = js_sys::Object::new();
                set(&event, "index", step.index as u32).map_err(e)?;
                set(&event, "steps", step.steps as u32).map_err(e)?;
                set(&event, "timestep", step.timestep).map_err(e)?;
                let preview =
                    crate::preview::preview(&inner.ctx, step.latents, &factors).await.map_err(|er| e(js_err(er)))?;
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
            let parameters = parameters_text(&req, kind.name(), image.width, image.height, &inner.model_name.borrow());
            let png = image.to_png(&parameters).map_err(|er| e(js_err(er)))?;
            let out = image_to_js(&image).map_err(e)?;
            set(&out, "parameters", parameters).map_err(e)?;
            set(&out, "png", js_sys::Uint8Array::from(png.as_slice())).map_err(e)?;
            Ok(out.into())
        })
    }

    /// Stops the running generation after its current step.
    pub fn cancel(&self) {
        self.inner.cancel.set(true);
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
