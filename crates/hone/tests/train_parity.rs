//! Three AdamW steps (linear schedule, clipping, weight decay, a padded batch of two) give
//! PEFT's losses and final LoRA weights, for LoRA and for QLoRA on an NF4 base
//! (tests/reference/make_train_fixtures.py), with activation checkpointing and without.

mod common;

use burn::backend::{Autodiff, NdArray};
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::lora::peft::Adapter;
use hone::lora::LoraConfig;
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::parity::rel_error;
use hone::train::Trainer;

type B = Autodiff<NdArray>;

fn check(qlora: bool, checkpointing: bool) {
    let fixtures = common::fixtures();
    let expected = SafeTensors::open(Box::new(FileSource::open(&fixtures.join("train/llama_adamw.safetensors")).unwrap())).unwrap();
    let samples = common::llama_training_samples();
    let device = Default::default();
    let mut model = load_model_with::<B>(&Dir(fixtures.join("llama")), LoadOptions { nf4: qlora.then(Nf4Options::default) }, &device).unwrap();
    let adapter = Adapter::read(&Dir(fixtures.join("lora/llama_peft_adapter"))).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    let cfg = common::three_adamw_steps(checkpointing);
    let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, ..Default::default() };
    let mut trainer = Trainer::new(model, lora, samples, cfg, device);
    let prefix = if qlora { "qlora." } else { "" };
    let (_, want_losses) = expected.read_f32(&format!("{prefix}losses")).unwrap();
    let mut losses = Vec::new();
    while !trainer.done() {
        losses.push(trainer.step().loss);
    }
    println!("qlora={qlora} checkpointing={checkpointing}: losses {losses:?} (PEFT {want_losses:?})");
    assert_eq!(losses.len(), 3);
    for (ours, theirs) in losses.iter().zip(&want_losses) {
        assert!(((ours - *theirs as f64) / *theirs as f64).abs() < 1e-4, "loss {ours} vs {theirs}");
    }
    let trained = trainer.adapter("x");
    let mut worst = 0f64;
    for layer in &trained.layers {
        for (which, ours) in [("lora_A", &layer.a), ("lora_B", &layer.b)] {
            let (_, theirs) = expected.read_f32(&format!("{prefix}base_model.model.{}.{which}.weight", layer.module)).unwrap();
            let err = rel_error(ours, &theirs);
            worst = worst.max(err);
            assert!(err < 1e-4, "{}.{which}: {err:.3e}", layer.module);
        }
    }
    println!("qlora={qlora} checkpointing={checkpointing}: {} layers, worst rel error of final A/B {worst:.2e}", trained.layers.len());
    assert_eq!(trained.layers.len(), 14);
}

#[test]
fn three_adamw_steps_match_peft() {
    check(false, true);
    check(false, false);
}

#[test]
fn three_adamw_steps_match_peft_on_nf4_base() {
    check(true, true);
    check(true, false);
}
