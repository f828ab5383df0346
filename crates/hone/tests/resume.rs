//! A run stopped after step k and resumed from its checkpoint ends with the same adapter, bit
//! for bit on the CPU, as the run that never stopped (with dropout, shuffling and accumulation),
//! with f32 moments and with bitsandbytes' 8-bit ones.

mod common;

use burn::backend::{Autodiff, NdArray};
use hone::data::dataset::{encode, parse_jsonl, EncodeOptions};
use hone::data::{ChatTemplate, Sample, Tokenizer};
use hone::io::Dir;
use hone::lora::peft::add_adapters;
use hone::lora::{LoraConfig, Targets};
use hone::model::load_model;
use hone::train::checkpoint::{self, SavedState};
use hone::train::optim::{HostMoments, Optim};
use hone::train::{Schedule, TrainConfig, Trainer};

type B = Autodiff<NdArray>;

fn samples() -> Vec<Sample> {
    let dir = Dir(common::fixtures().join("chat"));
    let tok = Tokenizer::open(&dir).unwrap();
    let template = ChatTemplate::open(&dir).unwrap().unwrap();
    let text = (0..7).map(|i| format!("{{\"prompt\": \"Question {i}: what is {i} plus {i}?\", \"completion\": \" It is {}.\"}}", 2 * i)).collect::<Vec<_>>().join("\n");
    let (examples, _) = parse_jsonl(&text, "mem.jsonl", None, false).unwrap();
    examples.iter().map(|e| encode(e, &tok, Some(&template), template.eos_token.as_deref(), EncodeOptions::default()).unwrap()).collect()
}

fn trainer(optim: Optim) -> Trainer<B> {
    let device = Default::default();
    let mut model = load_model::<B>(&Dir(common::fixtures().join("smollm2")), &device).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: Targets::AllLinear, use_rslora: false, seed: 5 };
    add_adapters(model.linears_mut(), &lora);
    // min_8bit_size 64: every r=4 A and B of this SmolLM2-shaped fixture (64 values and up) takes 8-bit moments.
    let cfg = TrainConfig { lr: 5e-3, schedule: Schedule::Cosine, warmup_steps: 2, batch_size: 2, grad_accum: 2, epochs: 3, seed: 11, optim, min_8bit_size: 64, ..Default::default() };
    Trainer::new(model, lora, samples(), cfg, device)
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    resume(Optim::AdamW);
}

#[test]
fn resumed_run_with_8bit_adamw_equals_uninterrupted_run() {
    resume(Optim::AdamW8bit);
}

/// The backend's dropout RNG is one per process: runs must not interleave.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn resume(optim: Optim) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut straight = trainer(optim);
    let mut straight_losses = Vec::new();
    while !straight.done() {
        straight_losses.push(straight.step().loss);
    }
    assert_eq!(straight.state.total_steps, 6);

    let dir = std::env::temp_dir().join(format!("hone-ckpt-{}-{}", std::process::id(), optim.name()));
    let mut first = trainer(optim);
    let mut losses = Vec::new();
    for _ in 0..3 {
        losses.push(first.step().loss);
    }
    let saved = SavedState { state: first.state.clone(), config: first.cfg.clone(), base_model: "smollm2".into(), best_eval_loss: None, best_step: None, evals_without_improvement: 0, reference_logps: Vec::new() };
    checkpoint::save(&dir, &first, &saved).unwrap();
    drop(first);

    let loaded = checkpoint::load(&dir).unwrap();
    let eight = loaded.moments.iter().filter(|s| matches!(s.moments, HostMoments::Int8(_))).count();
    assert_eq!(eight, if optim == Optim::AdamW8bit { loaded.moments.len() } else { 0 }, "8-bit moments in the checkpoint");
    let mut resumed = trainer(optim);
    resumed.restore(&loaded.adapter, loaded.moments, loaded.saved.state).unwrap();
    while !resumed.done() {
        losses.push(resumed.step().loss);
    }
    assert_eq!(losses, straight_losses);
    assert_eq!(resumed.adapter("x").weights_bytes(), straight.adapter("x").weights_bytes(), "adapters differ");
    // Training moved the adapter.
    assert!(straight_losses.last().unwrap() < straight_losses.first().unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}
