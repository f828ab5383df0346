//! hone's ops on burn's CubeCL backends (wgpu: Vulkan, Metal, WebGPU; CUDA): the kernels in
//! `shaders/`, launched on f32 tensors; other float types take the tensor-op defaults.

use super::{reference, register_matmul_for, macs, AdamWScalars, FrozenWeight, HoneBackend};
use crate::quant::dynamic_map::dynamic_map_table;
use crate::quant::frozen::StoredFloat;
use crate::quant::Nf4Weight;
use burn::tensor::{Int, Tensor};

/// A CubeCL tensor's primitive with its values laid out contiguously from offset 0 (what
/// hone's elementwise kernels index).
fn contiguous<R, F, I, BT>(t: Tensor<burn_cubecl::CubeBackend<R, F, I, BT>, 2>) -> burn_cubecl::tensor::CubeTensor<R>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    burn_cubecl::kernel::into_contiguous(t.into_primitive().tensor())
}

/// wgpu (Vulkan, Metal, WebGPU) and CUDA: burn's CubeCL backend.
impl<R, F, I, BT> HoneBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    /// hone's kernel where [`register_matmul_for`] says so (rank 2 to 4, f32), else burn's.
    fn matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        if !register_matmul_for(macs(&a.dims(), &b.dims())) || F::dtype() != burn::tensor::DType::F32 || !(2..=4).contains(&D) {
            return a.matmul(b);
        }
        let out = hone_shaders::matmul::matmul(a.into_primitive().tensor(), b.into_primitive().tensor());
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    /// One kernel each way (shaders/src/swiglu.rs) instead of seven and ten launches.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::swiglu(gate, up);
        }
        let out = hone_shaders::swiglu::swiglu(contiguous(gate), contiguous(up));
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::swiglu_backward(gate, up, dy);
        }
        let [dg, du] = hone_shaders::swiglu::swiglu_backward(contiguous(gate), contiguous(up), contiguous(dy)).map(|t| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t)));
        (dg, du)
    }

    /// One kernel (shaders/src/adamw.rs) instead of a dozen launches.
    fn adamw(param: Tensor<Self, 2>, grad: Tensor<Self, 2>, exp_avg: Tensor<Self, 2>, exp_avg_sq: Tensor<Self, 2>, s: AdamWScalars) -> [Tensor<Self, 2>; 3] {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::adamw(param, grad, exp_avg, exp_avg_sq, s);
        }
        let c = |x: f64| x as f32;
        let scalars = [c(s.decay), c(s.beta1_weight), c(s.beta2), c(s.beta2_weight), c(s.bias_correction2_sqrt), c(s.eps), c(s.step_size)];
        hone_shaders::adamw::adamw(contiguous(param), contiguous(grad), contiguous(exp_avg), contiguous(exp_avg_sq), scalars).map(|t| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t)))
    }

    fn nf4_dequantize(w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        // The kernel computes in f32 (hone's compute dtype everywhere).
        if F::dtype() != burn::tensor::DType::F32 || I::dtype() != burn::tensor::DType::I32 {
            return w.dequantize();
        }
        let words = w.words.clone().into_primitive();
        let out = hone_shaders::nf4::nf4_dequantize(words, absmax(w), w.out_features, w.in_features, w.blocksize);
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    fn unpack_words(words: Tensor<Self, 1, Int>, format: StoredFloat) -> Tensor<Self, 1> {
        let format = match format {
            StoredFloat::F32 => hone_shaders::unpack::Format::F32,
            StoredFloat::BF16 => hone_shaders::unpack::Format::BF16,
            StoredFloat::F16 => hone_shaders::unpack::Format::F16,
        };
        let words = burn_cubecl::kernel::into_contiguous(words.into_primitive());
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(hone_shaders::unpack::unpack(words, format)))
    }

    /// With hone's matmul kernel, `x·Wᵀ` reads W through strides (no copy, contiguous result);
    /// burn's kernel gets the `(W·xᵀ)ᵀ` form of the default.
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        if let Some(p) = &w.packed {
            return super::packed::matmul_t(x, p);
        }
        if let Some(q) = fused_nf4(w) {
            let x = burn_cubecl::kernel::into_contiguous(x.into_primitive().tensor());
            let y = hone_shaders::nf4_matmul::nf4_matmul_t(x, q.words.clone().into_primitive(), absmax(q), q.out_features, q.in_features, q.blocksize);
            return Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(y));
        }
        let ([m, k], [n, _]) = (x.dims(), w.dims());
        if crate::ops::register_matmul_for((m * k * n) as u64) {
            return <Self as HoneBackend>::matmul(x, w.to_dense().transpose());
        }
        <Self as HoneBackend>::matmul(w.to_dense(), x.transpose()).transpose()
    }

    /// NF4 weights decode inside the product (no dense weight-sized workspace).
    fn frozen_matmul_backward(dy: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        if let Some(p) = &w.packed {
            return super::packed::matmul(dy, p);
        }
        if let Some(q) = fused_nf4(w) {
            let dy = burn_cubecl::kernel::into_contiguous(dy.into_primitive().tensor());
            let dx = hone_shaders::nf4_matmul::nf4_matmul(dy, q.words.clone().into_primitive(), absmax(q), q.out_features, q.in_features, q.blocksize);
            return Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(dx));
        }
        <Self as HoneBackend>::matmul(dy, w.to_dense())
    }

    /// Natively and in the page (the wasm heap). `HONE_TABLES_ON_DEVICE` keeps them on the
    /// device natively (to compare the two).
    fn tables_on_host() -> bool {
        cfg!(target_arch = "wasm32") || std::env::var_os("HONE_TABLES_ON_DEVICE").is_none()
    }

    /// Waits for queued work, so the figures include it (a blocking call: native only).
    #[cfg(not(target_arch = "wasm32"))]
    fn device_memory(device: &Self::Device) -> Option<super::DeviceMemory> {
        let client = <R as burn_cubecl::cubecl::Runtime>::client(device);
        client.flush().ok()?;
        let usage = client.memory_usage().ok()?;
        Some(super::DeviceMemory { reserved: usage.bytes_reserved, in_use: usage.bytes_in_use })
    }

    /// Through host memory: burn 0.21's device-to-device copy calls server-to-server transfers
    /// that its wgpu server leaves unimplemented (a panic on the first move). A hidden state at
    /// a layer boundary is small (tokens × hidden), so the round trip costs little.
    #[cfg(not(target_arch = "wasm32"))]
    fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_data(x.into_data(), device)
    }
}

/// An NF4 weight's absmax as the kernels take it.
fn absmax<R, F, I, BT>(w: &Nf4Weight<burn_cubecl::CubeBackend<R, F, I, BT>>) -> hone_shaders::nf4::Absmax<R>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    match (&w.absmax, &w.absmax_codes, &w.nested) {
        (Some(a), _, _) => hone_shaders::nf4::Absmax::Plain(a.clone().into_primitive().tensor()),
        (None, Some(codes), Some(scales)) => hone_shaders::nf4::Absmax::Nested { codes: codes.clone().into_primitive(), scales: scales.clone().into_primitive().tensor(), table: *dynamic_map_table() },
        _ => panic!("an NF4 weight has plain or double-quantized absmax"),
    }
}

/// The NF4 weight of `w` where the fused products take it (f32 compute, i32 words, rows and
/// blocks in whole words).
fn fused_nf4<R, F, I, BT>(w: &FrozenWeight<burn_cubecl::CubeBackend<R, F, I, BT>>) -> Option<&Nf4Weight<burn_cubecl::CubeBackend<R, F, I, BT>>>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    let q = w.nf4.as_ref()?;
    let kinds = F::dtype() == burn::tensor::DType::F32 && I::dtype() == burn::tensor::DType::I32;
    (kinds && hone_shaders::nf4_matmul::supported(q.in_features, q.blocksize)).then_some(q)
}
