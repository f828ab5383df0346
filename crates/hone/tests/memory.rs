//! QLoRA's memory promise, measured with the wgpu backend's own accounting: between forward and
//! backward the graph keeps activations and the packed NF4 codes, never a dequantized weight.
//! The same check run with the dequantized weight saved for backward (a debug switch) fails,
//! which shows that the check can fail.

mod common;

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use cubecl::Runtime;
use hone::io::MemFiles;
use hone::lora::peft::add_adapters;
use hone::lora::{LoraConfig, Targets};
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::ops::{HoneBackend, SAVE_DEQUANTIZED_FOR_BACKWARD};
use hone::train::loss::causal_lm_loss;
use std::sync::atomic::Ordering;

type B = Autodiff<Wgpu>;

const HIDDEN: usize = 256;
const INTER: usize = 1024;
const LAYERS: usize = 4;
const VOCAB: usize = 64;
const TOKENS: usize = 8;

/// A synthetic Llama with big enough linears that one dequantized weight is easy to see.
fn model_files() -> MemFiles {
    common::Synthetic { hidden: HIDDEN, inter: INTER, layers: LAYERS, vocab: VOCAB, heads: 4, max_positions: 64 }.files()
}

/// Through hone's own accounting (what `hone train` reports on GPU backends), checked against
/// the pool's: what is reserved holds what is in use.
fn bytes_in_use(device: &burn::backend::wgpu::WgpuDevice) -> u64 {
    let m = <B as HoneBackend>::device_memory(device).expect("wgpu keeps a memory pool");
    let client = cubecl::wgpu::WgpuRuntime::client(device);
    assert_eq!(m.in_use, client.memory_usage().unwrap().bytes_in_use);
    assert!(m.reserved >= m.in_use, "{m:?}");
    m.in_use
}

/// Device bytes the autodiff graph holds after forward (before backward), and after backward.
fn held_by_graph() -> (u64, u64) {
    let device = burn::backend::wgpu::WgpuDevice::default();
    let mut model = load_model_with::<B>(&model_files(), LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 1 };
    add_adapters(model.linears_mut(), &lora);
    let ids: Vec<i64> = (0..TOKENS as i64).map(|i| (i * 7) % VOCAB as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, TOKENS]), &device);
    let rest = bytes_in_use(&device);
    let loss = causal_lm_loss(model.forward(&ids.to_data()), ids);
    let after_forward = bytes_in_use(&device);
    let grads = loss.backward();
    drop(grads);
    let after_backward = bytes_in_use(&device);
    (after_forward.saturating_sub(rest), after_backward.saturating_sub(rest))
}

#[test]
fn dequantized_weights_are_not_kept_for_backward() {
    let one_dequantized_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) as u64 * 4;
    // Saved activations: a few [tokens, INTER] tensors per layer, with generous room.
    let activations = (LAYERS * 32 * TOKENS * INTER * 4) as u64;
    let bound = one_dequantized_layer + activations;

    let (held, after) = held_by_graph();
    println!("held between forward and backward: {held} bytes (bound {bound}; one dequantized layer {one_dequantized_layer}); after backward {after}");
    assert!(held < bound, "the graph holds {held} bytes, over {bound}");

    SAVE_DEQUANTIZED_FOR_BACKWARD.store(true, Ordering::Relaxed);
    let (naive, _) = held_by_graph();
    SAVE_DEQUANTIZED_FOR_BACKWARD.store(false, Ordering::Relaxed);
    println!("naive (dequantized weights saved for backward): {naive} bytes");
    assert!(naive > bound, "the check cannot tell: naive {naive} <= bound {bound}");
    assert!(naive > held + (LAYERS as u64 - 1) * one_dequantized_layer, "naive {naive} vs {held}");
}

/// The CPU backend keeps no pool: its memory is the process's (peak RSS).
#[test]
fn the_cpu_backend_reports_no_device_pool() {
    type C = Autodiff<burn::backend::NdArray>;
    assert_eq!(<C as HoneBackend>::device_memory(&Default::default()), None);
}
