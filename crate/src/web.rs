//! The wasm-bindgen surface (wasm32 only). Everything below it is plain Rust that also builds natively;
//! errors become JS `Error`s here and nowhere else.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use crate::gpu::GpuContext;
use crate::pipeline::{Image, MemorySource, ModelSource, Request, StableDiffusion};
use crate::preview::PreviewFactors;
use crate::selfcheck;
use crate::weights::LoadPolicy;

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
    preview: RefCell<PreviewFactors>,
    cancel: Cell<bool>,
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
        let inner =
            EngineInner { ctx, model: Default::default(), preview: Default::default(), cancel: Default::default() };
        Ok(Engine { inner: Rc::new(inner) })
    }

    /// The adapter (or "CPU (candle)") and its limits.
    pub fn adapter(&self) -> Result<JsValue, JsError> {
        to_js(self.inner.ctx.summary())
    }

    /// Whether generation runs on the CPU fallback.
    #[wasm_bindgen(js_name = isCpu)]
    pub fn is_cpu(&self) -> bool {
        self.inner.ctx.is_cpu()
    }

    /// Loads a model from its files: a `Map` from diffusers-layout paths (`unet/config.json`, ...) to
    /// `Uint8Array`s (an optional `preview.json` sets the preview factors). Returns the model's defaults.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(&self, files: js_sys::Map) -> Result<JsValue, JsError> {
        let mut src = MemorySource::new();
        let mut bad_name = false;
        files.for_each(&mut |value, key| match key.as_string() {
            Some(path) => src.insert(path, js_sys::Uint8Array::new(&value).to_vec()),
            None => bad_name = true,
        });
        if bad_name {
            return Err(JsError::new("model file names must be strings"));
        }
        let sd = StableDiffusion::load(&self.inner.ctx, &src, LoadPolicy::F32).map_err(js_err)?;
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
        *self.inner.model.borrow_mut() = Some(Rc::new(sd));
        Ok(info.into())
    }

    /// Generates `request` ({prompt, negative_prompt, seed, steps, guidance, width, height, scheduler}).
    /// `on_step({index, steps, timestep, preview: {width, height, rgba}})` runs after every step. Resolves to
    /// `{width, height, rgba}`; rejects with "cancelled" after `cancel()`.
    pub fn generate(&self, request: JsValue, on_step: js_sys::Function) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let e = |e: JsError| JsValue::from(e);
            let req: Request =
                serde_wasm_bindgen::from_value(request).map_err(|er| e(JsError::new(&format!("bad request: {er}"))))?;
            let sd = inner.model.borrow().clone().ok_or_else(|| e(JsError::new("no model is loaded")))?;
            let factors = inner.preview.borrow().clone();
            inner.cancel.set(false);
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
                if inner.cancel.get() {
                    return Err(e(js_err(crate::Error::Cancelled)));
                }
            }
            let image = sd.decode(run.latents()).await.map_err(|er| e(js_err(er)))?;
            Ok(image_to_js(&image).map_err(e)?.into())
        })
    }

    /// Stops the running generation after its current step.
    pub fn cancel(&self) {
        self.inner.cancel.set(true);
    }
}
