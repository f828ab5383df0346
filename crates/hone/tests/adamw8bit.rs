//! 8-bit AdamW against bitsandbytes' `AdamW8bit` on the CPU (tests/reference/make_optim_fixtures.py):
//! its dynamic maps bit for bit, three updates of seeded tensors (whole and partial blocks, a
//! tensor under `min_8bit_size` keeping f32 moments) in parameters, codes and absmax, the same
//! updates on wgpu, and a three-step QLoRA run's losses and final adapter.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::lora::peft::Adapter;
use hone::lora::LoraConfig;
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::parity::rel_error;
use hone::quant::dynamic_map::{signed_dynamic_map, unsigned_dynamic_map};
use hone::train::adamw8bit::{adamw8bit_update, Int8Moments, Tables};
use hone::train::optim::{adamw_update, AdamWConfig, Moments, Optim};
use hone::train::{Schedule, TrainConfig, Trainer};

fn open(path: &str) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(&common::fixtures().join(path)).unwrap())).unwrap()
}

fn tensor<B: Backend>(st: &SafeTensors, name: &str, device: &B::Device) -> Tensor<B, 2> {
    let (shape, v) = st.read_f32(name).unwrap();
    Tensor::from_data(TensorData::new(v, [shape[0], shape[1]]), device)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let st = open("optim/adamw8bit_steps.safetensors");
    for (name, ours) in [("qmap1", signed_dynamic_map()), ("qmap2", unsigned_dynamic_map())] {
        let (_, theirs) = st.read_f32(name).unwrap();
        assert_eq!(ours.map(f32::to_bits).to_vec(), theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{name}");
    }
}

/// The fixture's three updates on backend `B`: final parameters, and for the 8-bit tensors the
/// host form of their moments.
fn run_steps<B: Backend + hone::ops::HoneBackend>(device: &B::Device) -> Vec<(String, Vec<f32>, Option<hone::train::adamw8bit::HostInt8Moments>)> {
    let st = open("optim/adamw8bit_steps.safetensors");
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let tables = Tables::<B>::new(device);
    let mut out = Vec::new();
    for k in ["a", "b", "c"] {
        let mut p = tensor::<B>(&st, &format!("{k}.init"), device);
        let dims = p.dims();
        let eight = dims[0] * dims[1] >= hone::train::adamw8bit::MIN_8BIT_SIZE;
        let mut q = Int8Moments::<B>::zeros(dims, device);
        let mut m = Moments::<B>::zeros(dims, device);
        for step in 0..3 {
            let g = tensor::<B>(&st, &format!("{k}.grad.{step}"), device);
            p = if eight { adamw8bit_update(p, g, &mut q, &tables, &cfg, 1e-3, step + 1) } else { adamw_update(p, g, &mut m, &cfg, 1e-3, step + 1) };
        }
        let host = eight.then(|| {
            let words = |t: &Tensor<B, 1, burn::tensor::Int>| t.clone().into_data().convert::<i32>().to_vec::<i32>().unwrap();
            q.host_from_words(&words(&q.state1), values(q.absmax1.clone()), &words(&q.state2), values(q.absmax2.clone()))
        });
        out.push((k.to_string(), values(p), host));
    }
    out
}

/// Compares against the fixture; returns the share of codes that differ.
fn compare(what: &str, ours: &[(String, Vec<f32>, Option<hone::train::adamw8bit::HostInt8Moments>)], param_tolerance: f64) -> f64 {
    let st = open("optim/adamw8bit_steps.safetensors");
    let (mut differ, mut total) = (0usize, 0usize);
    for (k, p, host) in ours {
        let (_, want) = st.read_f32(&format!("{k}.param")).unwrap();
        let e = rel_error(p, &want);
        println!("{what} {k}: parameters rel error {e:.2e}");
        assert!(e < param_tolerance, "{what} {k}: parameters rel error {e:.3e}");
        match host {
            None => assert!(st.info(&format!("{k}.absmax1")).is_none(), "{k}: bitsandbytes kept 8-bit state"),
            Some(h) => {
                for (name, codes, absmax) in [("1", &h.state1, &h.absmax1), ("2", &h.state2, &h.absmax2)] {
                    let (_, want_codes) = st.read_raw(&format!("{k}.state{name}")).unwrap();
                    let (_, want_absmax) = st.read_f32(&format!("{k}.absmax{name}")).unwrap();
                    assert_eq!(codes.len(), want_codes.len(), "{k}.state{name}");
                    let d = codes.iter().zip(&want_codes).filter(|(a, b)| a != b).count();
                    // A code that differs is the neighbouring one (a value on a cell's edge).
                    for (a, b) in codes.iter().zip(&want_codes) {
                        assert!((*a as i32 - *b as i32).abs() <= 1, "{k}.state{name}: code {a} vs {b}");
                    }
                    let e = rel_error(absmax, &want_absmax);
                    println!("{what} {k}.state{name}: {d} of {} codes differ, absmax rel error {e:.2e}", codes.len());
                    assert!(e < 1e-5, "{k}.absmax{name}: {e:.3e}");
                    differ += d;
                    total += codes.len();
                }
            }
        }
    }
    differ as f64 / total as f64
}

#[test]
fn three_updates_equal_bitsandbytes_on_the_cpu() {
    let ours = run_steps::<NdArray>(&Default::default());
    let share = compare("cpu", &ours, 1e-6);
    assert!(share < 1e-3, "{:.3}% of codes differ", share * 100.0);
}

#[test]
fn three_updates_on_wgpu_equal_bitsandbytes() {
    let ours = run_steps::<burn::backend::Wgpu>(&Default::default());
    let share = compare("wgpu", &ours, 1e-6);
    assert!(share < 1e-3, "{:.3}% of codes differ", share * 100.0);
}

#[test]
fn qlora_with_8bit_adamw_equals_peft_and_bitsandbytes() {
    type B = Autodiff<NdArray>;
    let fixtures = common::fixtures();
    let expected = open("train/llama_adamw8bit.safetensors");
    let samples = common::llama_training_samples();
    let device = Default::default();
    let mut model = load_model_with::<B>(&Dir(fixtures.join("llama")), LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    let adapter = Adapter::read(&Dir(fixtures.join("lora/llama_peft_adapter"))).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    let cfg = TrainConfig {
        lr: 1e-2,
        schedule: Schedule::Linear,
        adamw: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        optim: Optim::AdamW8bit,
        min_8bit_size: 256,
        max_grad_norm: Some(1.0),
        batch_size: 2,
        max_steps: Some(3),
        shuffle: false,
        seed: 0,
        ..Default::default()
    };
    let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, ..Default::default() };
    let mut trainer = Trainer::new(model, lora, samples, cfg, device);
    let (_, want_losses) = expected.read_f32("losses").unwrap();
    let mut losses = Vec::new();
    while !trainer.done() {
        losses.push(trainer.step().loss);
    }
    println!("8-bit AdamW QLoRA losses {losses:?} (bitsandbytes {want_losses:?})");
    for (ours, theirs) in losses.iter().zip(&want_losses) {
        assert!(((ours - *theirs as f64) / *theirs as f64).abs() < 1e-4, "loss {ours} vs {theirs}");
    }
    let eight = trainer.optimizer_state().iter().filter(|s| matches!(s.moments, hone::train::optim::HostMoments::Int8(_))).count();
    assert_eq!(eight, 24, "tensors of 256 values or more keep 8-bit moments, as bitsandbytes' 24 of 28");
    let trained = trainer.adapter("x");
    let mut worst = 0f64;
    for layer in &trained.layers {
        for (which, ours) in [("lora_A", &layer.a), ("lora_B", &layer.b)] {
            let (_, theirs) = expected.read_f32(&format!("base_model.model.{}.{which}.weight", layer.module)).unwrap();
            let err = rel_error(ours, &theirs);
            worst = worst.max(err);
            assert!(err < 1e-4, "{}.{which}: {err:.3e}", layer.module);
        }
    }
    println!("8-bit AdamW QLoRA: worst rel error of final A/B {worst:.2e}");
}

#[test]
fn optimizer_names_are_hones_and_transformers() {
    for (name, want) in [("adamw", Optim::AdamW), ("adamw_torch", Optim::AdamW), ("adamw_8bit", Optim::AdamW8bit), ("adamw_bnb_8bit", Optim::AdamW8bit), ("paged_adamw_8bit", Optim::AdamW8bit)] {
        let s = hone::train::RunSettings { optim: Some(name.into()), ..Default::default() };
        assert_eq!(s.train(0).unwrap().optim, want, "{name}");
    }
    let s = hone::train::RunSettings { optim: Some("sgd".into()), ..Default::default() };
    let e = s.train(0).unwrap_err().to_string();
    assert!(e.contains("optim") && e.contains("\"sgd\"") && e.contains("adamw_8bit"), "{e}");
}
