//! Activation checkpointing per decoder layer: peak memory of one micro-batch's forward and
//! backward, counted by this test binary's allocator (the NdArray backend keeps every tensor on
//! the heap), falls when checkpointing is on, and the gradients stay equal to the plain
//! backward's (the checkpointed loss taken ten positions at a time). One test only: the
//! counter is process-wide.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::Tensor;
use hone::data::Sample;
use hone::lora::peft::add_adapters;
use hone::lora::{LoraConfig, Targets};
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::parity::rel_error;
use hone::train::trainer::Batch;
use hone::train::{TrainConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

type B = Autodiff<NdArray>;
type Grads = Vec<(String, Vec<f32>)>;

const LAYERS: usize = 6;
const SEQ: usize = 128;
const ROWS: usize = 4;

/// Peak heap bytes above the starting level while computing one micro-batch's gradients.
fn measure(trainer: &Trainer<B>, batch: &Batch) -> (usize, f32, Grads) {
    let start = IN_USE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let (loss, grads) = trainer.gradients(batch, 1.0, 7);
    let peak = PEAK.load(Ordering::Relaxed) - start;
    let read = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
    let mut grads: Grads = grads.into_iter().map(|(k, g)| (k, read(g))).collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (peak, loss.into_data().to_vec::<f32>().unwrap()[0], grads)
}

#[test]
fn checkpointing_lowers_peak_memory_and_keeps_gradients() {
    let model_shape = common::Synthetic { hidden: 64, inter: 256, layers: LAYERS, vocab: 96, heads: 4, max_positions: SEQ };
    let device = Default::default();
    let mut model = load_model_with::<B>(&model_shape.files(), LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 3 };
    add_adapters(model.linears_mut(), &lora);
    common::randomize_lora_b(&mut model, 0.1, &device);
    let samples: Vec<Sample> = (0..ROWS)
        .map(|r| {
            let ids: Vec<u32> = (0..SEQ - r * 9).map(|i| ((i * 31 + r * 7) % 96) as u32).collect();
            Sample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids }
        })
        .collect();
    let batch = Batch::padded(&samples.iter().collect::<Vec<_>>(), 0);
    let mut trainer = Trainer::new(model, lora, samples.clone(), TrainConfig { checkpointing: false, logits_chunk: ROWS * 96 * 10, ..Default::default() }, device);

    // Warm-up: first calls allocate lasting caches (thread pools) that are not the step's.
    trainer.gradients(&batch, 1.0, 7);
    let (plain_peak, plain_loss, plain) = measure(&trainer, &batch);
    trainer.cfg.checkpointing = true;
    trainer.gradients(&batch, 1.0, 7);
    let (ckpt_peak, ckpt_loss, ckpt) = measure(&trainer, &batch);
    println!("peak heap over one micro-batch: {plain_peak} bytes plain, {ckpt_peak} bytes with checkpointing ({:.2}x)", ckpt_peak as f64 / plain_peak as f64);
    println!("loss {plain_loss} vs {ckpt_loss}");

    assert!((plain_loss - ckpt_loss).abs() <= 1e-5 * plain_loss.abs(), "loss {plain_loss} vs {ckpt_loss}");
    assert_eq!(plain.len(), LAYERS * 7 * 2);
    let mut worst = 0f64;
    for ((name, a), (name_b, b)) in plain.iter().zip(&ckpt) {
        assert_eq!(name, name_b);
        let err = rel_error(b, a);
        worst = worst.max(err);
        assert!(err < 1e-5, "{name}: rel error {err:.2e}");
        assert!(a.iter().any(|&v| v != 0.0), "{name}: zero gradient");
    }
    println!("worst gradient rel error {worst:.2e}");
    // Six layers' activations against one layer's plus six saved inputs: well under half.
    assert!(ckpt_peak * 2 < plain_peak, "checkpointing peak {ckpt_peak} vs plain {plain_peak}");
}
