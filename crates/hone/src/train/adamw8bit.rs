//! bitsandbytes' 8-bit AdamW (`bnb.optim.AdamW8bit`; transformers' `optim="adamw_bnb_8bit"` and
//! `"paged_adamw_8bit"`): both moments kept as one byte per value, blockwise (256 values per
//! block, an f32 absmax each), the first moment in the signed dynamic map and the second in the
//! unsigned one. Each update expands them to f32, steps as AdamW does, and quantizes them back
//! the way bitsandbytes' CPU kernel does (through its lookup grid). Tensors under
//! `min_8bit_size` values keep f32 moments, as bitsandbytes does. 2 bytes of state per LoRA
//! value (plus 8 per 256) instead of 8.
//!
//! Everything is tensor ops, so it runs on every backend (CPU, Vulkan/Metal, WebGPU, CUDA): the
//! codes sit four to an i32 word, like NF4's, because WGSL has no 8-bit storage.

use super::optim::AdamWConfig;
use crate::quant::dynamic_map::{quantize_lut, signed_dynamic_map, unsigned_dynamic_map, LUT_SIZE};
use crate::quant::frozen::{bytes_to_words, words_tensor};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

/// Values per absmax block (bitsandbytes' blockwise optimizers fix 256).
pub const BLOCK: usize = 256;
/// bitsandbytes' default `min_8bit_size`: smaller tensors keep 32-bit moments.
pub const MIN_8BIT_SIZE: usize = 4096;

/// Both moments of one parameter in 8 bits: codes four to a word (`[blocks·256/4]`, padding codes
/// past the tensor's end decode to 0) and one absmax per block.
#[derive(Debug, Clone)]
pub struct Int8Moments<B: Backend> {
    pub shape: [usize; 2],
    pub state1: Tensor<B, 1, Int>,
    pub absmax1: Tensor<B, 1>,
    pub state2: Tensor<B, 1, Int>,
    pub absmax2: Tensor<B, 1>,
}

/// The maps and lookup grids on one device, made once per run.
#[derive(Debug, Clone)]
pub struct Tables<B: Backend> {
    qmap1: Tensor<B, 1>,
    qmap2: Tensor<B, 1>,
    lut1: Tensor<B, 1, Int>,
    lut2: Tensor<B, 1, Int>,
}

impl<B: Backend> Tables<B> {
    pub fn new(device: &B::Device) -> Self {
        let map = |code: [f32; 256]| Tensor::<B, 1>::from_data(TensorData::new(code.to_vec(), [256]), device);
        let lut = |code: [f32; 256]| {
            let cells: Vec<i32> = quantize_lut(&code).into_iter().map(i32::from).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(cells, [LUT_SIZE]), (device, DType::I32))
        };
        Tables { qmap1: map(signed_dynamic_map()), qmap2: map(unsigned_dynamic_map()), lut1: lut(signed_dynamic_map()), lut2: lut(unsigned_dynamic_map()) }
    }
}

/// The same moments on the host, as a checkpoint stores them (bitsandbytes' state names).
#[derive(Debug, Clone, PartialEq)]
pub struct HostInt8Moments {
    pub state1: Vec<u8>,
    pub absmax1: Vec<f32>,
    pub state2: Vec<u8>,
    pub absmax2: Vec<f32>,
}

impl<B: Backend> Int8Moments<B> {
    /// Zero moments for a `[rows, cols]` parameter.
    pub fn zeros(shape: [usize; 2], device: &B::Device) -> Self {
        let blocks = (shape[0] * shape[1]).div_ceil(BLOCK);
        let codes = || words_tensor::<B>(vec![0; blocks * BLOCK / 4], device);
        Int8Moments { shape, state1: codes(), absmax1: Tensor::zeros([blocks], device), state2: codes(), absmax2: Tensor::zeros([blocks], device) }
    }

    pub fn from_host(shape: [usize; 2], h: &HostInt8Moments, device: &B::Device) -> Self {
        let blocks = (shape[0] * shape[1]).div_ceil(BLOCK);
        let codes = |c: &[u8]| {
            let mut c = c.to_vec();
            c.resize(blocks * BLOCK, 0);
            words_tensor::<B>(bytes_to_words(&c), device)
        };
        let f32s = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
        Int8Moments { shape, state1: codes(&h.state1), absmax1: f32s(&h.absmax1), state2: codes(&h.state2), absmax2: f32s(&h.absmax2) }
    }

    /// Values of the parameter.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// The host form from the device's words and absmax (read back by the caller).
    pub fn host_from_words(&self, state1: &[i32], absmax1: Vec<f32>, state2: &[i32], absmax2: Vec<f32>) -> HostInt8Moments {
        let bytes = |w: &[i32]| w.iter().flat_map(|w| w.to_le_bytes()).take(self.numel()).collect();
        HostInt8Moments { state1: bytes(state1), absmax1, state2: bytes(state2), absmax2 }
    }
}

/// `[blocks, 256]` f32 values of codes `words` into `map`, times each block's absmax.
fn dequantize<B: Backend>(words: &Tensor<B, 1, Int>, absmax: &Tensor<B, 1>, map: &Tensor<B, 1>) -> Tensor<B, 2> {
    let n_words = words.dims()[0];
    let bytes: Vec<Tensor<B, 2, Int>> = (0..4).map(|k| words.clone().bitwise_right_shift_scalar(((8 * k) as i32).elem()).bitwise_and_scalar(255i32.elem()).unsqueeze_dim(1)).collect();
    let codes = Tensor::cat(bytes, 1).reshape([n_words * 4]);
    let blocks = n_words * 4 / BLOCK;
    map.clone().select(0, codes).reshape([blocks, BLOCK]) * absmax.clone().unsqueeze_dim(1)
}

/// bitsandbytes' CPU blockwise quantization of `x: [blocks, 256]` through `lut`: per block
/// absmax, the values times its f32 reciprocal, clamped to [-1, 1], placed on the grid; an
/// all-zero block gets code 0. Returns the words and the absmax.
fn quantize<B: Backend>(x: Tensor<B, 2>, lut: &Tensor<B, 1, Int>) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let [blocks, _] = x.dims();
    let absmax = x.clone().abs().max_dim(1);
    let zero = absmax.clone().equal_elem(0.0);
    let inv = absmax.clone().recip().mask_fill(zero.clone(), 0.0);
    let scaled = (x * inv).clamp(-1.0, 1.0);
    let cell = scaled.add_scalar(1.0).mul_scalar(0.5).mul_scalar((LUT_SIZE - 1) as f64).add_scalar(0.5);
    // An all-zero block: cell 0, whose code is 0 in both maps' grids.
    let cell = cell.mask_fill(zero.expand([blocks, BLOCK]), 0.0).int();
    let codes = lut.clone().select(0, cell.reshape([blocks * BLOCK])).reshape([blocks * BLOCK / 4, 4]);
    let mut words = codes.clone().narrow(1, 0, 1);
    for k in 1..3 {
        words = words.bitwise_or(codes.clone().narrow(1, k, 1).bitwise_left_shift_scalar(((8 * k) as i32).elem()));
    }
    // The top byte as a signed one (`(c ^ 128) - 128`), so that every word is an i32 value
    // whatever the width of the backend's integers.
    let top = codes.narrow(1, 3, 1).bitwise_xor_scalar(128i32.elem()).sub_scalar(128i32);
    let words = words.bitwise_or(top.bitwise_left_shift_scalar(24i32.elem()));
    (words.reshape([blocks * BLOCK / 4]), absmax.reshape([blocks]))
}

/// `x: [rows, cols]` flattened and zero-padded to `[blocks, 256]`.
fn blocked<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let [r, c] = x.dims();
    let n = r * c;
    let blocks = n.div_ceil(BLOCK);
    let flat = x.reshape([n]);
    let flat = if blocks * BLOCK > n { Tensor::cat(vec![flat.clone(), Tensor::zeros([blocks * BLOCK - n], &flat.device())], 0) } else { flat };
    flat.reshape([blocks, BLOCK])
}

/// One 8-bit AdamW update of `param` with `grad` (`step` counts from 1), in bitsandbytes' order:
/// `m = β₁m + (1−β₁)g`, `v = β₂v + (1−β₂)g²`, `p ← p(1 − lr·wd)`, then
/// `p += −lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`; the moments are requantized.
pub fn adamw8bit_update<B: Backend>(param: Tensor<B, 2>, grad: Tensor<B, 2>, m: &mut Int8Moments<B>, tables: &Tables<B>, cfg: &AdamWConfig, lr: f64, step: usize) -> Tensor<B, 2> {
    let [r, c] = param.dims();
    let g = blocked(grad);
    let m1 = dequantize(&m.state1, &m.absmax1, &tables.qmap1).mul_scalar(cfg.beta1) + g.clone().mul_scalar(1.0 - cfg.beta1);
    let v1 = dequantize(&m.state2, &m.absmax2, &tables.qmap2).mul_scalar(cfg.beta2) + g.clone().mul_scalar(1.0 - cfg.beta2) * g;
    let correction1 = 1.0 - cfg.beta1.powi(step as i32);
    let correction2 = (1.0 - cfg.beta2.powi(step as i32)).sqrt();
    let denom = v1.clone().sqrt().div_scalar(correction2).add_scalar(cfg.eps);
    let mut p = blocked(param);
    if cfg.weight_decay > 0.0 {
        p = p.mul_scalar(1.0 - lr * cfg.weight_decay);
    }
    // torch's addcdiv: `p + (value·m)/denom`, in that order.
    let p = p + m1.clone().mul_scalar(-lr / correction1) / denom;
    (m.state1, m.absmax1) = quantize(m1, &tables.lut1);
    (m.state2, m.absmax2) = quantize(v1, &tables.lut2);
    p.reshape([m.state1.dims()[0] * 4]).narrow(0, 0, r * c).reshape([r, c])
}
