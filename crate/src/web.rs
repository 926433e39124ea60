//! The wasm-bindgen surface (wasm32 only). Everything below it is plain Rust that also builds natively;
//! errors become JS `Error`s here and nowhere else.

use wasm_bindgen::prelude::*;

use crate::gpu::GpuContext;
use crate::selfcheck;

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
