//! Frozen base weights on the device, dense or NF4, and the one op that uses them:
//! `y = x·Wᵀ`. Under autodiff the op has its own backward, `dx = dy·W`, which dequantizes W
//! again from the packed codes: the dequantized weight is never kept from forward to backward
//! (QLoRA's memory saving), and W gets no gradient.

use super::nf4::{Nf4Tensor, NF4_CODE};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// NF4 codes on the device: 8 codes per i32 word, the packed bytes in bitsandbytes' order
/// (little-endian within the word), and one f32 absmax per block. Double-quantized absmax is
/// expanded to f32 on the host at load, so that dequantizing on any device is one exact f32
/// multiply per value and equals bitsandbytes bit for bit.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    pub words: Tensor<B, 1, Int>,
    pub absmax: Tensor<B, 1>,
    pub out_features: usize,
    pub in_features: usize,
    pub blocksize: usize,
}

impl<B: Backend> Nf4Weight<B> {
    pub fn from_host(q: &Nf4Tensor, device: &B::Device) -> Self {
        let [out_features, in_features] = match q.shape.as_slice() {
            [o, i] => [*o, *i],
            other => panic!("NF4 weight must be 2-D, got {other:?}"),
        };
        let words: Vec<i32> = q
            .packed
            .chunks(4)
            .map(|c| i32::from_le_bytes(std::array::from_fn(|k| c.get(k).copied().unwrap_or(0))))
            .collect();
        let n_words = words.len();
        let absmax = q.absmax_f32();
        let n_blocks = absmax.len();
        Nf4Weight {
            words: Tensor::from_data(TensorData::new(words, [n_words]), device),
            absmax: Tensor::from_data(TensorData::new(absmax, [n_blocks]), device),
            out_features,
            in_features,
            blocksize: q.blocksize,
        }
    }

    /// The dense `[out, in]` weight, `code[q] * absmax[block]`, with tensor ops only, so it runs
    /// on every backend (CPU, Vulkan/Metal, WebGPU, CUDA).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let device = self.words.device();
        let n = self.out_features * self.in_features;
        let n_words = self.words.dims()[0];
        // Element 2j sits in the high nibble of byte j; byte b of a word is bits 8b..8b+8.
        let nibbles: Vec<Tensor<B, 2, Int>> = (0..8)
            .map(|k| {
                let shift = 8 * (k / 2) + if k % 2 == 0 { 4 } else { 0 };
                self.words.clone().bitwise_right_shift_scalar(burn::tensor::ElementConversion::elem(shift as i32)).bitwise_and_scalar(burn::tensor::ElementConversion::elem(15i32)).unsqueeze_dim(1)
            })
            .collect();
        let codes = Tensor::cat(nibbles, 1).reshape([n_words * 8]);
        let table = Tensor::<B, 1>::from_data(TensorData::new(NF4_CODE.to_vec(), [16]), &device);
        let values = table.select(0, codes);
        let n_blocks = self.absmax.dims()[0];
        let padded = n_blocks * self.blocksize;
        let values = if n_words * 8 >= padded {
            values.narrow(0, 0, padded)
        } else {
            Tensor::cat(vec![values, Tensor::zeros([padded - n_words * 8], &device)], 0)
        };
        let w = values.reshape([n_blocks, self.blocksize]) * self.absmax.clone().unsqueeze_dim(1);
        w.reshape([padded]).narrow(0, 0, n).reshape([self.out_features, self.in_features])
    }
}

/// A frozen base weight `[out, in]`.
#[derive(Module, Debug)]
pub struct FrozenWeight<B: Backend> {
    pub dense: Option<Tensor<B, 2>>,
    pub nf4: Option<Nf4Weight<B>>,
}

impl<B: Backend> FrozenWeight<B> {
    pub fn dense(w: Tensor<B, 2>) -> Self {
        FrozenWeight { dense: Some(w), nf4: None }
    }
    pub fn nf4(w: Nf4Weight<B>) -> Self {
        FrozenWeight { dense: None, nf4: Some(w) }
    }
    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.dense, &self.nf4) {
            (Some(w), _) => w.dims(),
            (None, Some(q)) => [q.out_features, q.in_features],
            (None, None) => unreachable!("a frozen weight is dense or NF4"),
        }
    }
    pub fn is_quantized(&self) -> bool {
        self.nf4.is_some()
    }
    /// Where the weight lives (layers may sit on different devices).
    pub fn device(&self) -> B::Device {
        match (&self.dense, &self.nf4) {
            (Some(w), _) => w.device(),
            (None, Some(q)) => q.words.device(),
            (None, None) => unreachable!("a frozen weight is dense or NF4"),
        }
    }
}

impl<B: HoneBackend> FrozenWeight<B> {
    /// The weight as a dense tensor (dequantized if NF4, with the backend's kernel).
    pub fn to_dense(&self) -> Tensor<B, 2> {
        match (&self.dense, &self.nf4) {
            (Some(w), _) => w.clone(),
            (None, Some(q)) => B::nf4_dequantize(q),
            (None, None) => unreachable!("a frozen weight is dense or NF4"),
        }
    }
}

/// The backends hone runs on: burn's, plus hone's ops on frozen weights.
pub trait HoneBackend: crate::ops::FusedOps {
    /// `x·Wᵀ` for `x: [m, in]`, computed as `(W·xᵀ)ᵀ`: W stays in its stored `[out, in]`
    /// layout, and only activation-sized operands are transposed (on the CPU backend a
    /// transposed weight is copied whole at every call; measured 0.5 s per token on SmolLM2).
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        Self::matmul(w.to_dense(), x.transpose()).transpose()
    }

    /// `dy·W` for `dy: [m, out]`: the gradient of `x·Wᵀ` with respect to `x`.
    fn frozen_matmul_backward(dy: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        Self::matmul(dy, w.to_dense())
    }

    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for a frozen W `[out, in]` plus a trainable low-rank term, A
    /// `[r, in]` and B `[out, r]` (what LoRA adds; this layer knows only the algebra), and
    /// `x·Aᵀ`, which the backward reuses. One op, so that autodiff records one node rather than
    /// a dozen, and the CPU runs it as a few GEMMs on shared operands (measured on SmolLM2: the
    /// low-rank terms of 180 linears took 30% of a training step as separate tensor ops).
    fn lowrank_forward(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let t = Self::matmul(x.clone(), a.transpose());
        let y = Self::frozen_matmul(x, w) + Self::matmul(t.clone(), b.transpose()).mul_scalar(scaling);
        (y, t)
    }

    /// The gradients of [`HoneBackend::lowrank_forward`]'s output with respect to `x`, A and B,
    /// given `dy` and the forward's `t = x·Aᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn lowrank_backward(dy: Tensor<Self, 2>, x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, t: Tensor<Self, 2>, scaling: f64) -> [Tensor<Self, 2>; 3] {
        let g = Self::matmul(dy.clone(), b).mul_scalar(scaling);
        let dx = Self::frozen_matmul_backward(dy.clone(), w) + Self::matmul(g.clone(), a);
        let da = Self::matmul(g.transpose(), x);
        let db = Self::matmul(dy.transpose(), t).mul_scalar(scaling);
        [dx, da, db]
    }

    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` (see [`HoneBackend::lowrank_forward`]); under autodiff, one node
    /// with its own backward.
    fn frozen_matmul_lowrank(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> Tensor<Self, 2> {
        Self::lowrank_forward(x, w, a, b, scaling).0
    }

    /// The dense weight of an NF4 one. By default with tensor ops (any backend); GPU backends
    /// run the kernel in `shaders/`.
    fn nf4_dequantize(w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        w.dequantize()
    }

    /// `x` copied to another device (a model split across devices). By default burn's own copy.
    fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
        x.to_device(device)
    }
}

/// At most this many rows of `x` take the matrix-vector path on the CPU (generation's one new
/// token per sequence).
#[cfg(not(target_arch = "wasm32"))]
const GEMV_ROWS: usize = 4;

#[cfg(not(target_arch = "wasm32"))]
use crate::ops::cpu::{gemm, with_f32};

#[cfg(not(target_arch = "wasm32"))]
impl HoneBackend for burn::backend::NdArray {
    /// A few rows (generation): one dot product per weight row, rows split across threads. A
    /// GEMM library packs the whole weight into panels on every call, which for one token costs
    /// more than the product (measured on SmolLM2: 61% of generation time in packing).
    ///
    /// More rows (training, prompts): one GEMM reading W in its stored `[out, in]` layout as Wᵀ
    /// through strides, into a contiguous `[m, out]` (burn's matmul on a transposed operand
    /// leaves a transposed result that the next op copies whole).
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        use rayon::prelude::*;
        let [m, k] = x.dims();
        let device = x.device();
        let [n, _] = w.dims();
        if m > GEMV_ROWS {
            if let Some(y) = with_nf4_codes(w, |codes| with_f32(x.clone(), |x| super::nf4_gemm::matmul_t(x, m, codes, n, k))) {
                return Tensor::from_data(TensorData::new(y, [m, n]), &device);
            }
            // y[m, n] = x[m, k] · Wᵀ, W[n, k] row-major: Wᵀ has row stride 1, column stride k.
            return dense_gemm(m, k, n, w.to_dense(), (1, k), x);
        }
        let mut y = vec![0f32; m * n];
        with_f32(w.to_dense(), |weight| {
            with_f32(x, |x| {
                // Output laid out [n, m] while computing (one weight row per task), transposed after.
                y.par_chunks_mut(m).zip(weight.par_chunks(k)).for_each(|(out, row)| {
                    for (r, o) in out.iter_mut().enumerate() {
                        *o = dot(row, &x[r * k..(r + 1) * k]);
                    }
                });
            })
        });
        let yt: Vec<f32> = (0..m * n).map(|i| y[(i % n) * m + i / n]).collect();
        Tensor::from_data(TensorData::new(yt, [m, n]), &device)
    }

    /// dx[m, k] = dy[m, n] · W[n, k], both row-major.
    fn frozen_matmul_backward(dy: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        let [m, n] = dy.dims();
        let [_, k] = w.dims();
        if let Some(dx) = with_nf4_codes(w, |codes| with_f32(dy.clone(), |dy| super::nf4_gemm::matmul(dy, m, codes, n, k))) {
            return Tensor::from_data(TensorData::new(dx, [m, k]), &dy.device());
        }
        dense_gemm(m, n, k, w.to_dense(), (k, 1), dy)
    }

    /// The frozen product as above, then the low-rank term added into it by two GEMMs
    /// (operands read through strides, nothing transposed or copied).
    fn lowrank_forward(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let [m, k] = x.dims();
        let [r, _] = a.dims();
        let [n, _] = w.dims();
        let device = x.device();
        let mut y = into_values(Self::frozen_matmul(x.clone(), w));
        let mut t = vec![0f32; m * r];
        with_f32(x, |x| with_f32(a, |a| gemm(m, k, r, 1.0, (x, k, 1), (a, 1, k), 0.0, &mut t, r)));
        with_f32(b, |b| gemm(m, r, n, scaling as f32, (&t, r, 1), (b, 1, r), 1.0, &mut y, n));
        (Tensor::from_data(TensorData::new(y, [m, n]), &device), Tensor::from_data(TensorData::new(t, [m, r]), &device))
    }

    fn lowrank_backward(dy: Tensor<Self, 2>, x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, t: Tensor<Self, 2>, scaling: f64) -> [Tensor<Self, 2>; 3] {
        let [m, n] = dy.dims();
        let [r, k] = a.dims();
        let device = dy.device();
        let mut dx = into_values(Self::frozen_matmul_backward(dy.clone(), w));
        let (mut g, mut da, mut db) = (vec![0f32; m * r], vec![0f32; r * k], vec![0f32; n * r]);
        let s = scaling as f32;
        with_f32(dy, |dy| {
            // g = s·dy·B [m, r]; db = s·dyᵀ·t [n, r]
            with_f32(b, |b| gemm(m, n, r, s, (dy, n, 1), (b, r, 1), 0.0, &mut g, r));
            with_f32(t, |t| gemm(n, m, r, s, (dy, 1, n), (t, r, 1), 0.0, &mut db, r));
        });
        // dx += g·A [m, k]; da = gᵀ·x [r, k]
        with_f32(a, |a| gemm(m, r, k, 1.0, (&g, r, 1), (a, k, 1), 1.0, &mut dx, k));
        with_f32(x, |x| gemm(r, m, k, 1.0, (&g, 1, r), (x, k, 1), 0.0, &mut da, k));
        let t = |v: Vec<f32>, shape: [usize; 2]| Tensor::from_data(TensorData::new(v, shape), &device);
        [t(dx, [m, k]), t(da, [r, k]), t(db, [n, r])]
    }

    /// On the CPU the codes are already in host memory: one tight loop over the backend's own
    /// arrays (words read in place, blocks split across threads), `blocksize` values per absmax and
    /// a byte-to-two-codes table (measured on SmolLM2: dequantizing went from a third of a
    /// training step's time to a few percent).
    fn nf4_dequantize(w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        use super::nf4_gemm::Words;
        let n = w.out_features * w.in_features;
        let mut values = vec![0f32; w.absmax.dims()[0] * w.blocksize];
        // Byte b holds element 2j in its high nibble and 2j+1 in its low one; a word holds 4
        // bytes (8 values), little-endian.
        let pairs: [[f32; 2]; 256] = std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 15]]);
        let decode = |out: &mut [f32], word: u32| {
            for (pair, b) in out.chunks_exact_mut(2).zip(word.to_le_bytes()) {
                pair.copy_from_slice(&pairs[b as usize]);
            }
        };
        // Blocks split across threads: each piece decodes its words, then scales. The words are
        // read in place from the backend's array, whichever integer type it holds them in.
        fn dequantize_into<T: Copy + Sync>(values: &mut [f32], words: &[T], absmax: &[f32], blocksize: usize, decode: &(impl Fn(&mut [f32], T) + Sync)) {
            use rayon::prelude::*;
            const BLOCKS: usize = 256;
            let piece = BLOCKS * blocksize;
            values.par_chunks_mut(piece).enumerate().for_each(|(p, out)| {
                let words = &words[(p * piece / 8).min(words.len())..];
                out.chunks_mut(8).zip(words).for_each(|(o, &v)| decode(o, v));
                for (block, &scale) in out.chunks_exact_mut(blocksize).zip(&absmax[p * BLOCKS..]) {
                    for v in block {
                        *v *= scale;
                    }
                }
            });
        }
        nf4_codes(w, |codes| match codes.words {
            Words::I64(s) => dequantize_into(&mut values, s, codes.absmax, w.blocksize, &|o: &mut [f32], v: i64| decode(o, v as u32)),
            Words::I32(s) => dequantize_into(&mut values, s, codes.absmax, w.blocksize, &|o: &mut [f32], v: i32| decode(o, v as u32)),
        });
        values.truncate(n);
        Tensor::from_data(TensorData::new(values, [w.out_features, w.in_features]), &w.words.device())
    }
}

/// wgpu (Vulkan, Metal, WebGPU) and CUDA: burn's CubeCL backend.
impl<R, F, I, BT> HoneBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn nf4_dequantize(w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        // The kernel computes in f32 (hone's compute dtype everywhere).
        if F::dtype() != burn::tensor::DType::F32 || I::dtype() != burn::tensor::DType::I32 {
            return w.dequantize();
        }
        let words = w.words.clone().into_primitive();
        let absmax = w.absmax.clone().into_primitive().tensor();
        let out = hone_shaders::nf4::nf4_dequantize(words, absmax, w.out_features, w.in_features, w.blocksize);
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    /// With hone's matmul kernel, `x·Wᵀ` reads W through strides (no copy, contiguous result);
    /// burn's kernel gets the `(W·xᵀ)ᵀ` form of the default.
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        let ([m, k], [n, _]) = (x.dims(), w.dims());
        if crate::ops::register_matmul_for((m * k * n) as u64) {
            return <Self as crate::ops::FusedOps>::matmul(x, w.to_dense().transpose());
        }
        <Self as crate::ops::FusedOps>::matmul(w.to_dense(), x.transpose()).transpose()
    }

    /// Through host memory: burn 0.21's device-to-device copy calls server-to-server transfers
    /// that its wgpu server leaves unimplemented (a panic on the first move). A hidden state at
    /// a layer boundary is small (tokens × hidden), so the round trip costs little.
    #[cfg(not(target_arch = "wasm32"))]
    fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_data(x.into_data(), device)
    }
}

/// A debug switch that makes the autodiff op keep the dequantized weight for backward (the
/// naive way), so that a test can show its memory check fails on it. Never on in normal use.
pub static SAVE_DEQUANTIZED_FOR_BACKWARD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

mod autodiff {
    use super::{FrozenWeight, HoneBackend, SAVE_DEQUANTIZED_FOR_BACKWARD};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::module::AutodiffModule;
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Tensor, TensorPrimitive};

    /// Backward of `x·Wᵀ` for a frozen W. Its state is the frozen weight itself: for NF4 the
    /// packed codes (a handle, no copy), dequantized again only here.
    #[derive(Debug)]
    struct FrozenMatmulBackward;

    impl<B: HoneBackend> Backward<B, 1> for FrozenMatmulBackward {
        type State = FrozenWeight<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [parent] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            if let Some(node) = parent {
                let dy = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
                let dx = B::frozen_matmul_backward(dy, &ops.state);
                grads.register::<B>(node.id, dx.into_primitive().tensor());
            }
        }
    }

    /// Backward of `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`: keeps the frozen weight (a handle), x, A, B and
    /// `t = x·Aᵀ` (`[m, r]`), and gives x, A and B their gradients in one call.
    #[derive(Debug)]
    struct LowrankBackward;

    /// What [`LowrankBackward`] keeps from the forward pass.
    #[derive(Debug, Clone)]
    struct LowrankState<B: HoneBackend> {
        w: FrozenWeight<B>,
        x: FloatTensor<B>,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        t: FloatTensor<B>,
        scaling: f64,
    }

    fn float<B: HoneBackend>(t: FloatTensor<B>) -> Tensor<B, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    impl<B: HoneBackend> Backward<B, 3> for LowrankBackward {
        type State = LowrankState<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let grads_of = B::lowrank_backward(float(dy), float(s.x), &s.w, float(s.a), float(s.b), float(s.t), s.scaling);
            for (parent, g) in ops.parents.into_iter().zip(grads_of) {
                if let Some(node) = parent {
                    grads.register::<B>(node.id, g.into_primitive().tensor());
                }
            }
        }
    }

    /// Backward of a copy between devices: the gradient goes back to where `x` was.
    #[derive(Debug)]
    struct MoveBackward<const D: usize>;

    impl<B: HoneBackend, const D: usize> Backward<B, 1> for MoveBackward<D> {
        type State = B::Device;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [parent] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            if let Some(node) = parent {
                let g = B::move_to(Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grad)), &ops.state);
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }

    impl<B: HoneBackend, C: CheckpointStrategy> HoneBackend for Autodiff<B, C> {
        fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
            let x = x.into_primitive().tensor();
            let from = B::float_device(&x.primitive);
            let y = B::move_to(Tensor::<B, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone())), device).into_primitive().tensor();
            let out = match MoveBackward::<D>.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(from, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }

        fn frozen_matmul_lowrank(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> Tensor<Self, 2> {
            if SAVE_DEQUANTIZED_FOR_BACKWARD.load(std::sync::atomic::Ordering::Relaxed) {
                return Self::frozen_matmul(x.clone(), w) + x.matmul(a.transpose()).matmul(b.transpose()).mul_scalar(scaling);
            }
            let inner_w: FrozenWeight<B> = w.valid();
            let (x, a, b) = (x.into_primitive().tensor(), a.into_primitive().tensor(), b.into_primitive().tensor());
            let (y, t) = B::lowrank_forward(float(x.primitive.clone()), &inner_w, float(a.primitive.clone()), float(b.primitive.clone()), scaling);
            let y = y.into_primitive().tensor();
            let out = match LowrankBackward.prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let state = LowrankState { w: inner_w, x: x.primitive, a: a.primitive, b: b.primitive, t: t.into_primitive().tensor(), scaling };
                    prep.finish(state, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }

        fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
            if SAVE_DEQUANTIZED_FOR_BACKWARD.load(std::sync::atomic::Ordering::Relaxed) {
                return x.matmul(w.to_dense().transpose());
            }
            let inner_w: FrozenWeight<B> = w.valid();
            let x = x.into_primitive().tensor();
            let y = B::frozen_matmul(Tensor::from_primitive(TensorPrimitive::Float(x.primitive.clone())), &inner_w);
            let y = y.into_primitive().tensor();
            let out = match FrozenMatmulBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(inner_w, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }
    }
}

/// Runs `f` on an NF4 weight's codes, read in place from the backend's arrays (words as i64 or
/// i32, whichever the backend holds; absmax f32).
#[cfg(not(target_arch = "wasm32"))]
fn nf4_codes<R>(q: &Nf4Weight<burn::backend::NdArray>, f: impl FnOnce(&super::nf4_gemm::Codes) -> R) -> R {
    use super::nf4_gemm::{Codes, Words};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::TensorPrimitive;
    let absmax = match q.absmax.clone().into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(s)) => s,
        _ => panic!("NF4 absmax must be f32"),
    };
    let absmax = absmax.view();
    let absmax = absmax.as_slice().expect("absmax is built contiguous");
    match q.words.clone().into_primitive() {
        NdArrayTensor::I64(s) => f(&Codes { words: Words::I64(s.view().as_slice().expect("contiguous words")), absmax, blocksize: q.blocksize }),
        NdArrayTensor::I32(s) => f(&Codes { words: Words::I32(s.view().as_slice().expect("contiguous words")), absmax, blocksize: q.blocksize }),
        other => panic!("NF4 words stored as {:?}", burn::tensor::TensorMetadata::dtype(&other)),
    }
}

/// [`nf4_codes`] where the fused AVX-512 kernels apply (see [`super::nf4_gemm::supported`]);
/// `None` for dense weights and other machines.
#[cfg(not(target_arch = "wasm32"))]
fn with_nf4_codes<R>(w: &FrozenWeight<burn::backend::NdArray>, f: impl FnOnce(&super::nf4_gemm::Codes) -> R) -> Option<R> {
    let q = w.nf4.as_ref()?;
    super::nf4_gemm::supported(q.in_features, q.blocksize).then(|| nf4_codes(q, f))
}

/// `a[m, k] · B` into a new contiguous `[m, n]`, B a dense `[·]` weight read with strides
/// `(row, column)` as a `[k, n]` matrix; `a` an activation, borrowed when contiguous.
#[cfg(not(target_arch = "wasm32"))]
fn dense_gemm(m: usize, k: usize, n: usize, b: Tensor<burn::backend::NdArray, 2>, strides: (usize, usize), a: Tensor<burn::backend::NdArray, 2>) -> Tensor<burn::backend::NdArray, 2> {
    let device = a.device();
    let mut c = vec![0f32; m * n];
    with_f32(b, |b| with_f32(a, |a| gemm(m, k, n, 1.0, (a, k, 1), (b, strides.0, strides.1), 0.0, &mut c, n)));
    Tensor::from_data(TensorData::new(c, [m, n]), &device)
}

/// The values of a contiguous tensor this op just made, taken without a copy when unshared.
#[cfg(not(target_arch = "wasm32"))]
fn into_values(t: Tensor<burn::backend::NdArray, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().expect("hone computes in f32")
}

/// Σ a·b with eight partial sums (so that the compiler keeps them in vector registers).
#[cfg(not(target_arch = "wasm32"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
