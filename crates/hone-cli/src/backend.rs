//! Choosing the compute backend at run time.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn NdArray on the CPU.
    Cpu,
    /// burn wgpu: Vulkan, Metal or DX12, whichever the machine has.
    Wgpu,
    /// burn CUDA (build with `--features cuda`); libcuda is loaded at run time.
    Cuda,
}

/// Runs `f` with the chosen backend's type and device.
macro_rules! with_backend {
    ($kind:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $kind {
            $crate::backend::BackendKind::Cpu => {
                type $B = burn::backend::NdArray;
                let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
            $crate::backend::BackendKind::Wgpu => {
                type $B = burn::backend::Wgpu;
                let $device = burn::backend::wgpu::WgpuDevice::default();
                $crate::backend::init_wgpu(&$device)?;
                $crate::backend::probe::<$B>("wgpu", &$device)?;
                $body
            }
            $crate::backend::BackendKind::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    type $B = burn::backend::Cuda;
                    let $device = burn::backend::cuda::CudaDevice::default();
                    $crate::backend::probe::<$B>("cuda", &$device)?;
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                {
                    anyhow::bail!("this hone was built without CUDA; rebuild with `cargo build --release -p hone-cli --features cuda`")
                }
            }
        }
    }};
}
pub(crate) use with_backend;

/// Touches the device once, turning the backend's panic when no driver is present (no libcuda,
/// no Vulkan adapter) into an error the user can act on.
pub fn probe<B: burn::tensor::backend::Backend>(name: &str, device: &B::Device) -> anyhow::Result<()> {
    let device = device.clone();
    catching(name, move || {
        let t = burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar();
    })
}

/// Runs `f`, turning a panic (how burn reports a missing driver or device) into an error
/// naming the backend.
fn catching<T>(name: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(prev);
    result.map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        hone::Error::Backend { backend: name.into(), message: format!("cannot use the device: {msg}") }.into()
    })
}

/// Products up to this many multiply-adds (4.2M) run on hone's matmul kernel on lavapipe and
/// llvmpipe: burn's tiled kernel is 2-5x faster there on SmolLM2's linears (6.6M multiply-adds
/// and up; `cargo test --release -p hone --test matmul_wgpu -- --ignored --nocapture`), hone's
/// on the small products of LoRA, attention and small models (the bench's browser fixture trains
/// 3-4x faster with it: 160 → 500-670 tokens/s).
const SOFTWARE_VULKAN_MATMUL_LIMIT: u64 = 1 << 22;

/// Sets up wgpu's default adapter (once per process) and picks the matmul kernel for it (see
/// `hone::ops::use_register_matmul_up_to`): burn's on real GPUs, hone's barrier-free one on
/// SwiftShader, and on other CPU adapters (lavapipe, llvmpipe) hone's for small products.
/// `HONE_MATMUL=hone|burn|<max multiply-adds>` overrides the choice.
pub fn init_wgpu(device: &burn::backend::wgpu::WgpuDevice) -> anyhow::Result<()> {
    use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, RuntimeOptions};
    static LIMIT: std::sync::OnceLock<Result<u64, String>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| {
        catching("wgpu", || {
            let setup = init_setup::<AutoGraphicsApi>(device, RuntimeOptions::default());
            let l = setup.device.limits();
            // Frozen tables bigger than the adapter can bind are loaded in parts that fit.
            hone::ops::set_max_buffer_bytes(l.max_buffer_size.min(l.max_storage_buffer_binding_size as u64));
            let info = setup.adapter.get_info();
            match info.device_type {
                wgpu::DeviceType::Cpu if info.name.to_lowercase().contains("swiftshader") => u64::MAX,
                wgpu::DeviceType::Cpu => SOFTWARE_VULKAN_MATMUL_LIMIT,
                _ => 0,
            }
        })
        .map_err(|e| e.to_string())
    });
    let limit = limit.clone().map_err(anyhow::Error::msg)?;
    let limit = match std::env::var("HONE_MATMUL").as_deref() {
        Ok("hone") => u64::MAX,
        Ok("burn") => 0,
        Ok(other) => other.parse().map_err(|_| anyhow::anyhow!("HONE_MATMUL={other}: expected `hone`, `burn` or a number of multiply-adds"))?,
        Err(_) => limit,
    };
    hone::ops::use_register_matmul_up_to(limit);
    // A smaller limit than the adapter's, to exercise split tables (tests).
    if let Ok(v) = std::env::var("HONE_MAX_BUFFER") {
        hone::ops::set_max_buffer_bytes(v.parse().map_err(|_| anyhow::anyhow!("HONE_MAX_BUFFER={v}: expected a number of bytes"))?);
    }
    Ok(())
}

/// Devices for a device map: the chosen device and its siblings of the same kind by index
/// (CUDA devices 0, 1, …; wgpu's discrete GPUs 0, 1, … when the default adapter was chosen).
pub fn placement<B: burn::tensor::backend::Backend>(device: &B::Device, map: &hone::train::plan::DeviceMap) -> anyhow::Result<hone::model::Placement<B::Device>> {
    let n = map.device_bytes.len();
    let devices: Vec<B::Device> = if n > 1 { (0..n).map(|i| sibling::<B>(device, i)).collect() } else { vec![device.clone()] };
    for (i, d) in devices.iter().enumerate() {
        probe::<B>(&format!("device {i} of {n}"), d)?;
    }
    Ok(hone::model::Placement::from_indices(&devices, &map.layer_device)?)
}

/// Device `index` of the chosen device's kind. A kind without an index (wgpu's "default
/// adapter") cannot name several GPUs; the backend's first kind can (wgpu's discrete GPUs,
/// CUDA's devices).
pub fn sibling<B: burn::tensor::backend::Backend>(device: &B::Device, index: usize) -> B::Device {
    use burn::prelude::DeviceOps;
    use burn::tensor::backend::DeviceId;
    let id = device.to_id();
    let indexed = B::Device::from_id(DeviceId { type_id: id.type_id, index_id: 1 }) != B::Device::from_id(DeviceId { type_id: id.type_id, index_id: 0 });
    let type_id = if indexed { id.type_id } else { 0 };
    B::Device::from_id(DeviceId { type_id, index_id: index as u16 })
}
