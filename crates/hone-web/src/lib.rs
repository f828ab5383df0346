//! hone in the browser: the wasm-bindgen API that the page's Web Worker calls.
//!
//! The compute device is WebGPU through burn's wgpu backend, created asynchronously (a
//! synchronous setup panics on wasm), and every read back is `into_data_async`.

#![cfg(target_arch = "wasm32")]

pub mod blob;
pub mod session;

use burn::backend::wgpu::{graphics::WebGpu, init_setup_async, RuntimeOptions, WgpuDevice};
use hone::io::MemFiles;
use hone::model::CausalLm;
use std::cell::RefCell;
use wasm_bindgen::prelude::*;

pub type Backend = burn::backend::Wgpu;

thread_local! {
    static DEVICE: RefCell<Option<WgpuDevice>> = const { RefCell::new(None) };
    /// The largest buffer the device allows (min of maxBufferSize and maxStorageBufferBindingSize).
    pub(crate) static LIMITS: RefCell<u64> = const { RefCell::new(0) };
    static LOST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The WebGPU device, set up on first use. cubecl requests it with the adapter's own limits and
/// features (so a 1 GiB maxBufferSize adapter gives 1 GiB buffers, not WebGPU's 256 MiB default).
pub async fn device() -> WgpuDevice {
    if let Some(d) = DEVICE.with(|d| d.borrow().clone()) {
        return d;
    }
    let device = WgpuDevice::default();
    let setup = init_setup_async::<WebGpu>(&device, RuntimeOptions::default()).await;
    let l = setup.device.limits();
    let largest = l.max_buffer_size.min(l.max_storage_buffer_binding_size as u64);
    LIMITS.with(|x| *x.borrow_mut() = largest);
    // Frozen tables bigger than this are loaded in parts that fit.
    hone::ops::set_max_buffer_bytes(largest);
    setup.device.set_device_lost_callback(|reason, message| {
        LOST.with(|x| *x.borrow_mut() = Some(format!("{reason:?}: {message}")));
    });
    hone::ops::use_register_matmul(software_adapter().await);
    DEVICE.with(|d| *d.borrow_mut() = Some(device.clone()));
    device
}

/// Whether the browser's WebGPU adapter is a CPU underneath (Chromium's SwiftShader, or any
/// adapter the browser marks as a fallback), from `adapter.info`: there hone's barrier-free
/// matmul kernel runs several times faster than burn's tiled one. (wgpu does not pass the
/// adapter's kind through on the web.)
async fn software_adapter() -> bool {
    use wasm_bindgen::JsCast;
    let get = |o: &JsValue, k: &str| js_sys::Reflect::get(o, &JsValue::from_str(k)).unwrap_or(JsValue::UNDEFINED);
    let gpu = get(&get(&js_sys::global(), "navigator"), "gpu");
    let Ok(request) = get(&gpu, "requestAdapter").dyn_into::<js_sys::Function>() else { return false };
    let Ok(Ok(promise)) = request.call0(&gpu).map(|p| p.dyn_into::<js_sys::Promise>()) else { return false };
    let Ok(adapter) = wasm_bindgen_futures::JsFuture::from(promise).await else { return false };
    let info = get(&adapter, "info");
    get(&info, "isFallbackAdapter").as_bool() == Some(true) || get(&info, "architecture").as_string().is_some_and(|a| a.to_lowercase().contains("swiftshader"))
}

/// Why the GPU device was lost, if it was (the page then resumes from its last checkpoint in a
/// fresh worker).
#[wasm_bindgen(js_name = deviceLost)]
pub fn device_lost() -> Option<String> {
    LOST.with(|x| x.borrow().clone())
}

/// A CSV dataset (header row first) as the JSONL the page trains on, each row on its own line
/// number (hone::data::table); a bad row names `name:line`.
#[wasm_bindgen(js_name = csvToJsonl)]
pub fn csv_to_jsonl(text: String, name: String) -> Result<String, JsError> {
    hone::data::table::csv_to_jsonl(text.as_bytes(), &name, &Default::default()).map_err(js_err)
}

/// A Parquet dataset's rows as JSONL, row N on line N (hone::data::table); a bad row names
/// `name:row`. A file damaged badly enough to make the parquet crate panic stops the worker
/// (wasm has no unwinding); natively it is a named error.
#[wasm_bindgen(js_name = parquetToJsonl)]
pub fn parquet_to_jsonl(bytes: Vec<u8>, name: String) -> Result<String, JsError> {
    hone::data::table::parquet_bytes_to_jsonl(bytes, &name, &Default::default()).map_err(js_err)
}

pub(crate) fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// A model loaded from files the page handed over (name → bytes).
#[wasm_bindgen]
pub struct Model {
    inner: CausalLm<Backend>,
}

#[wasm_bindgen]
impl Model {
    /// `files` maps file names (config.json, model.safetensors, shards, index) to `Uint8Array`s.
    pub async fn load(files: js_sys::Map) -> Result<Model, JsError> {
        let mut set = MemFiles::new("model");
        for entry in files.entries() {
            let pair: js_sys::Array = entry.map_err(|_| JsError::new("bad files map"))?.into();
            let name = pair.get(0).as_string().ok_or_else(|| JsError::new("file names must be strings"))?;
            let bytes = js_sys::Uint8Array::new(&pair.get(1)).to_vec();
            set.insert(name, bytes);
        }
        let device = device().await;
        let inner = hone::model::load_model::<Backend>(&set, &device).map_err(js_err)?;
        Ok(Model { inner })
    }

    /// Logits `[ids.length, vocab]`, row-major.
    pub async fn logits(&self, ids: Vec<u32>) -> Result<Vec<f32>, JsError> {
        logits(&self.inner, &ids).await
    }
}

/// Logits for one sequence, read back asynchronously.
pub async fn logits(model: &CausalLm<Backend>, ids: &[u32]) -> Result<Vec<f32>, JsError> {
    let data = model.logits(ids).into_data_async().await.map_err(|e| JsError::new(&format!("{e:?}")))?;
    data.to_vec::<f32>().map_err(|e| JsError::new(&format!("{e:?}")))
}
