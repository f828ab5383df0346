//! hone's backend extension: every fused op and custom kernel, in one trait, [`HoneBackend`],
//! whose default methods are burn's tensor ops ([`reference`]; any backend runs them), and one
//! file per backend beside it that overrides them:
//!
//! - `ndarray.rs` — the CPU (burn NdArray): threaded single passes over the arrays, strided
//!   GEMMs (`cpu.rs`), NF4 products that decode codes into the GEMM's tiles (`nf4_gemm.rs`, one
//!   kernel per CPU level: AVX2, AVX-512, NEON, chosen by `simd.rs`);
//! - `cubecl.rs` — wgpu (Vulkan, Metal, WebGPU) and CUDA: the CubeCL kernels of `shaders/`;
//! - `autodiff.rs` — burn's autodiff over either: each op one graph node with its own backward.
//!
//! The fused ops exist because burn runs them as many small ops (its sigmoid alone is five
//! passes: measured at 7% of a SmolLM2 training step, the loss's exp/log at as much again), and
//! the frozen-weight ops because QLoRA must never keep a dense copy of a frozen weight.

mod autodiff;
mod cubecl;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod cpu;
#[cfg(not(target_arch = "wasm32"))]
mod ndarray;
#[cfg(not(target_arch = "wasm32"))]
pub mod nf4_gemm;
pub mod packed;
pub mod reference;
#[cfg(not(target_arch = "wasm32"))]
pub mod simd;

use crate::quant::frozen::StoredFloat;
use crate::quant::{FrozenWeight, Nf4Weight};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

/// Sizes of one self-attention call: `batch` rows of `seq` tokens, `heads` query heads sharing
/// `kv_heads` key/value heads (grouped-query attention), `head_dim` values per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The scalars of one AdamW update, in `torch.optim.AdamW`'s order of operations (see
/// `train::optim`): `p·decay`, `m + (g − m)·beta1_weight`, `v·beta2 + g²·beta2_weight`,
/// `p − m / (√v / bias_correction2_sqrt + eps) · step_size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub decay: f64,
    pub beta1_weight: f64,
    pub beta2: f64,
    pub beta2_weight: f64,
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
    pub step_size: f64,
}

/// What a GPU backend's memory pool holds (burn's CubeCL memory management): `reserved` is what
/// it took from the driver, which it keeps until told to clean up, so read after a step it is
/// the step's peak; `in_use` is what live tensors occupy now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceMemory {
    pub reserved: u64,
    pub in_use: u64,
}

/// Up to how many multiply-adds (`batch·m·k·n`) GPU backends run a matrix product with hone's
/// barrier-free kernel (`shaders/src/matmul.rs`) instead of burn's tiled one: 0 (never) on real
/// GPUs; every size on SwiftShader (the browser's software adapter), where burn's kernel was 5-10x
/// slower at every size measured; small products only on lavapipe and llvmpipe, where burn's
/// kernel is 2-5x faster on SmolLM2's linears but hone's wins on small ones.
static REGISTER_MATMUL_LIMIT: AtomicU64 = AtomicU64::new(0);

/// hone's matmul kernel for products of every size (`true`) or none (see
/// [`REGISTER_MATMUL_LIMIT`]); the front ends call this once they know the adapter's kind.
pub fn use_register_matmul(on: bool) {
    use_register_matmul_up_to(if on { u64::MAX } else { 0 });
}

/// hone's matmul kernel for products of at most `max_macs` multiply-adds.
pub fn use_register_matmul_up_to(max_macs: u64) {
    REGISTER_MATMUL_LIMIT.store(max_macs, Ordering::Relaxed);
}

/// Whether a product of `macs` multiply-adds runs on hone's kernel.
pub fn register_matmul_for(macs: u64) -> bool {
    let limit = REGISTER_MATMUL_LIMIT.load(Ordering::Relaxed);
    limit > 0 && macs <= limit
}

/// The largest buffer the device may bind, in bytes: frozen tables bigger than this are split
/// into parts (a WebGPU adapter binds at most `maxStorageBufferBindingSize`, 1 GiB on
/// SwiftShader, 128 MiB by default elsewhere). No limit until a front end sets one.
static MAX_BUFFER_BYTES: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets the largest buffer a frozen table's part may take (the front ends call this with the
/// adapter's limits before loading a model).
pub fn set_max_buffer_bytes(bytes: u64) {
    MAX_BUFFER_BYTES.store(bytes.max(4), Ordering::Relaxed);
}

pub fn max_buffer_bytes() -> u64 {
    MAX_BUFFER_BYTES.load(Ordering::Relaxed)
}

/// `batch·m·k·n` of `a · b` for `[.., m, k]` and `[.., k, n]` (batch dimensions broadcast).
fn macs<const D: usize>(a: &[usize; D], b: &[usize; D]) -> u64 {
    let batch: usize = (0..D - 2).map(|d| a[d].max(b[d])).product();
    (batch * a[D - 2] * a[D - 1] * b[D - 1]) as u64
}

/// The backends hone runs on: burn's, plus hone's fused ops and its ops on frozen weights.
/// Targets below zero (transformers' -100) are not counted by the loss. The defaults are burn's
/// tensor ops ([`reference`]).
pub trait HoneBackend: Backend {
    /// `a · b` for `[.., m, k]` and `[.., k, n]` (burn's matmul by default).
    fn matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        a.matmul(b)
    }

    /// `silu(gate) * up`, both `[rows, cols]`.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::swiglu(gate, up)
    }

    /// The gradients of [`FusedOps::swiglu`] with respect to `gate` and `up`, given `dy`.
    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        reference::swiglu_backward(gate, up, dy)
    }

    /// RMSNorm of each row of `x: [rows, d]`, `x / √(mean(x²) + eps) · w`, and each row's
    /// `1 / √(mean(x²) + eps)` `[rows]`, which the backward reuses.
    fn rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        reference::rms_norm(x, w, eps)
    }

    /// The gradients of [`FusedOps::rms_norm`] with respect to `x` and `w`, given `dy`.
    fn rms_norm_backward(x: Tensor<Self, 2>, w: Tensor<Self, 1>, r: Tensor<Self, 1>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        reference::rms_norm_backward(x, w, r, dy)
    }

    /// One AdamW update: the new parameter and moments `[param, exp_avg, exp_avg_sq]`.
    fn adamw(param: Tensor<Self, 2>, grad: Tensor<Self, 2>, exp_avg: Tensor<Self, 2>, exp_avg_sq: Tensor<Self, 2>, s: AdamWScalars) -> [Tensor<Self, 2>; 3] {
        reference::adamw(param, grad, exp_avg, exp_avg_sq, s)
    }

    /// Self-attention over tokens laid out as the projections give them: `q` `[B·T, H·D]`,
    /// `k`, `v` `[B·T, KV·D]`; RoPE (transformers' rotate-half on the first `rot` dims, tables
    /// `cos`, `sin` `[1 or B, 1, T, rot]`) on q and k, scores scaled by `1/√D` plus the additive
    /// `mask` `[1 or B, 1, T, T]`, softmax, times v. Returns the output `[B·T, H·D]` (what
    /// o_proj reads) and the probabilities `[B·H·T·T]` (for the backward). The default is the
    /// tensor-op version ([`reference::self_attention`]); `None` would make the decoder use
    /// tensor ops that autodiff records one by one.
    fn self_attention(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], mask: Tensor<Self, 4>, shape: AttentionShape) -> Option<(Tensor<Self, 2>, Tensor<Self, 1>)> {
        Some(reference::self_attention(q, k, v, rope, mask, shape))
    }

    /// The gradients of [`FusedOps::self_attention`] with respect to q, k and v, given the output's
    /// gradient `dy` and the forward's probabilities. Only called where `self_attention` gave `Some`.
    #[allow(clippy::too_many_arguments)]
    fn self_attention_backward(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], probs: Tensor<Self, 1>, dy: Tensor<Self, 2>, shape: AttentionShape) -> [Tensor<Self, 2>; 3] {
        reference::self_attention_backward(q, k, v, rope, probs, dy, shape)
    }

    /// Per row of `logits: [rows, vocab]`: `-log softmax(row)[target]` (0 where the target is
    /// negative), and the row's log-sum-exp, which the backward reuses.
    fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        reference::cross_entropy(logits, targets)
    }

    /// The gradient of [`FusedOps::cross_entropy`]'s first output with respect to the logits:
    /// `dy · (softmax − onehot(target))` on counted rows, 0 on the others.
    fn cross_entropy_backward(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>, lse: Tensor<Self, 1>, dy: Tensor<Self, 1>) -> Tensor<Self, 2> {
        reference::cross_entropy_backward(logits, targets, lse, dy)
    }

    /// `x·Wᵀ` for `x: [m, in]`, computed as `(W·xᵀ)ᵀ`: W stays in its stored `[out, in]`
    /// layout, and only activation-sized operands are transposed (on the CPU backend a
    /// transposed weight is copied whole at every call; measured 0.5 s per token on SmolLM2).
    /// A packed weight (embeddings, lm_head) goes by row chunks of W unpacked to f32
    /// ([`packed`]), so no weight-sized f32 copy is ever made.
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        if let Some(p) = &w.packed {
            return packed::matmul_t(x, p);
        }
        Self::matmul(w.to_dense(), x.transpose()).transpose()
    }

    /// `dy·W` for `dy: [m, out]`: the gradient of `x·Wᵀ` with respect to `x`.
    fn frozen_matmul_backward(dy: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        if let Some(p) = &w.packed {
            return packed::matmul(dy, p);
        }
        Self::matmul(dy, w.to_dense())
    }

    /// Rows `ids` `[n]` of a frozen table `[rows, cols]` as f32 `[n, cols]` (the embedding
    /// lookup): only the rows read are converted.
    fn frozen_rows(w: &FrozenWeight<Self>, ids: Tensor<Self, 1, Int>) -> Tensor<Self, 2> {
        if let Some(p) = &w.packed {
            return packed::rows(p, ids);
        }
        w.to_dense().select(0, ids)
    }

    /// The f32 values of packed words, `format.per_word()` per word in order (the first in the
    /// low bits). Each backend decodes the bits itself: burn has no bit-cast op.
    fn unpack_words(words: Tensor<Self, 1, Int>, format: StoredFloat) -> Tensor<Self, 1>;

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

    /// Whether an untied embedding table is kept in host memory
    /// ([`crate::quant::frozen::PackedWeight::on_host`]): on native GPU backends, where device
    /// memory is the scarce kind and a lookup reads a few rows, the page's WebGPU included (the
    /// ids are host data there already: see `CausalLm::embed`). Not on the CPU, whose tables
    /// are host memory already.
    fn tables_on_host() -> bool {
        false
    }

    /// The device memory pool's figures, where the backend keeps one (native GPU backends);
    /// `None` on the CPU, whose memory is the process's, and in wasm, where the pool's query is
    /// a blocking call.
    fn device_memory(_device: &Self::Device) -> Option<DeviceMemory> {
        None
    }

    /// `x` copied to another device (a model split across devices). By default burn's own copy.
    fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
        x.to_device(device)
    }
}

impl<B: HoneBackend> FrozenWeight<B> {
    /// The weight as a dense f32 tensor (dequantized if NF4, unpacked if packed, with the
    /// backend's kernels): for merges and tests, never in a training step.
    pub fn to_dense(&self) -> Tensor<B, 2> {
        match (&self.dense, &self.nf4, &self.packed) {
            (Some(w), _, _) => w.clone(),
            (_, Some(q), _) => B::nf4_dequantize(q),
            (_, _, Some(p)) => packed::dense(p),
            _ => unreachable!("a frozen weight is dense, NF4 or packed"),
        }
    }
}

/// A debug switch that makes the autodiff op keep the dequantized weight for backward (the
/// naive way), so that a test can show its memory check fails on it. Never on in normal use.
pub static SAVE_DEQUANTIZED_FOR_BACKWARD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
