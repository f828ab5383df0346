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

fn trainer(optim: Optim, use_dora: bool) -> Trainer<B> {
    let device = Default::default();
    let mut model = load_model::<B>(&Dir(common::fixtures().join("smollm2")), &device).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: Targets::AllLinear, use_rslora: false, use_dora, init: Default::default(), seed: 5 };
    add_adapters(model.linears_mut(), &lora);
    // min_8bit_size 64: every r=4 A and B of this SmolLM2-shaped fixture (64 values and up) takes 8-bit moments.
    let cfg = TrainConfig { lr: 5e-3, schedule: Schedule::Cosine, warmup_steps: 2, batch_size: 2, grad_accum: 2, epochs: 3, seed: 11, optim, min_8bit_size: 64, ..Default::default() };
    Trainer::new(model, lora, samples(), cfg, device)
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    resume(Optim::AdamW, false);
}

#[test]
fn resumed_dora_run_equals_uninterrupted_run() {
    // The magnitudes and their moments are saved and restored as well.
    resume(Optim::AdamW, true);
}

#[test]
fn resumed_run_with_8bit_adamw_equals_uninterrupted_run() {
    resume(Optim::AdamW8bit, false);
}

/// The backend's dropout RNG is one per process: runs must not interleave.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn resume(optim: Optim, dora: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut straight = trainer(optim, dora);
    let mut straight_losses = Vec::new();
    while !straight.done() {
        straight_losses.push(straight.step().loss);
    }
    assert_eq!(straight.state.total_steps, 6);

    let dir = std::env::temp_dir().join(format!("hone-ckpt-{}-{}-{dora}", std::process::id(), optim.name()));
    let mut first = trainer(optim, dora);
    let mut losses = Vec::new();
    for _ in 0..3 {
        losses.push(first.step().loss);
    }
    let saved = SavedState { state: first.state.clone(), config: first.cfg.clone(), base_model: "smollm2".into(), best_eval_loss: None, best_step: None, evals_without_improvement: 0, reference_logps: Vec::new() };
    checkpoint::save(&dir, &first, &saved, None).unwrap();
    drop(first);

    let loaded = checkpoint::load(&dir).unwrap();
    let eight = loaded.moments.iter().filter(|s| matches!(s.moments, HostMoments::Int8(_))).count();
    assert_eq!(eight, if optim == Optim::AdamW8bit { loaded.moments.len() } else { 0 }, "8-bit moments in the checkpoint");
    let mut resumed = trainer(optim, dora);
    resumed.restore(&loaded.adapter, loaded.moments, loaded.saved.state).unwrap();
    while !resumed.done() {
        losses.push(resumed.step().loss);
    }
    assert_eq!(losses, straight_losses);
    assert_eq!(resumed.adapter("x").use_dora, dora);
    assert_eq!(loaded_moments_named_magnitude(&dir), dora);
    assert_eq!(resumed.adapter("x").weights_bytes(), straight.adapter("x").weights_bytes(), "adapters differ");
    // Training moved the adapter.
    assert!(straight_losses.last().unwrap() < straight_losses.first().unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Whether the checkpoint holds moments for DoRA's magnitudes.
fn loaded_moments_named_magnitude(dir: &std::path::Path) -> bool {
    checkpoint::load(dir).unwrap().moments.iter().any(|s| s.name.ends_with(".lora_magnitude_vector"))
}

#[test]
fn damaged_checkpoints_are_refused_by_name_and_the_other_slot_resumes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("hone-ckpt-damaged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = trainer(Optim::AdamW, false);
    let saved = |t: &Trainer<B>| SavedState { state: t.state.clone(), config: t.cfg.clone(), base_model: "smollm2".into(), best_eval_loss: None, best_step: None, evals_without_improvement: 0, reference_logps: Vec::new() };
    let step_of = |dir: &std::path::Path| checkpoint::load(dir).map(|l| l.saved.state.step);
    assert!(!checkpoint::exists(&dir));
    for _ in 0..2 {
        t.step();
        checkpoint::save(&dir, &t, &saved(&t), None).unwrap();
    }
    // Two slots, the newest resumed.
    assert!(checkpoint::exists(&dir));
    assert_eq!(step_of(&dir).unwrap(), 2);
    let (a, b) = (dir.join("a"), dir.join("b"));
    assert!(checkpoint::read(&Dir(a.clone())).is_ok() && checkpoint::read(&Dir(b.clone())).is_ok());

    // One flipped bit in the newest slot's moments: refused by file, the other slot resumes,
    // and the damaged one is set aside.
    let moments = b.join(checkpoint::OPTIMIZER_FILE);
    let mut bytes = std::fs::read(&moments).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x10;
    std::fs::write(&moments, &bytes).unwrap();
    let err = checkpoint::read(&Dir(b.clone())).err().expect("a flipped bit is caught").to_string();
    assert!(err.contains("b/optimizer.safetensors") && err.contains("SHA-256"), "{err}");
    assert_eq!(step_of(&dir).unwrap(), 1);
    assert!(dir.join("b.damaged").is_dir() && !b.exists());

    // The next save goes to the free slot and leaves the one resumed from alone.
    t.step();
    checkpoint::save(&dir, &t, &saved(&t), None).unwrap();
    assert_eq!(step_of(&dir).unwrap(), 3);
    assert!(checkpoint::read(&Dir(a.clone())).is_ok());

    // A file cut short, a missing checksums.json: each named.
    let weights = b.join(hone::lora::peft::ADAPTER_WEIGHTS_FILE);
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::File::options().write(true).open(&weights).unwrap().set_len(len - 8).unwrap();
    let err = checkpoint::read(&Dir(b.clone())).err().unwrap().to_string();
    assert!(err.contains("b/adapter_model.safetensors") && err.contains(&format!("{} bytes where the checkpoint wrote {len}", len - 8)), "{err}");
    std::fs::remove_file(a.join(checkpoint::CHECKSUMS_FILE)).unwrap();
    let err = checkpoint::read(&Dir(a.clone())).err().unwrap().to_string();
    assert!(err.contains("checksums.json") && err.contains("not a complete checkpoint"), "{err}");
    // Both slots damaged: no resume, and both faults named.
    let err = step_of(&dir).err().unwrap().to_string();
    assert!(err.contains("no whole checkpoint") && err.contains("step 3:") && err.contains("step 1:"), "{err}");

    // The one-directory layout of earlier versions (no checksums) still resumes.
    let legacy = dir.join("legacy");
    let files = checkpoint::checkpoint_files(&t.adapter("smollm2"), None, t.optimizer_state(), &saved(&t));
    std::fs::create_dir_all(&legacy).unwrap();
    for (name, bytes) in files.iter().filter(|(n, _)| *n != checkpoint::CHECKSUMS_FILE) {
        std::fs::write(legacy.join(name), bytes).unwrap();
    }
    assert_eq!(step_of(&legacy).unwrap(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}
