//! Preference pairs and DPO's numbers equal TRL 1.16's DPOTrainer
//! (tests/reference/make_preference_fixtures.py): the processed ids of each format, the pairs
//! `max_length` drops and its keep-start truncation, and on the tiny Llama with a given adapter
//! each pair's policy and reference log-probabilities, then the loss and every reward metric
//! for sigmoid, ipo and hinge, on the CPU and on wgpu (lavapipe). Bad pairs name `file:line`.

mod common;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use hone::data::preference::{drop_fully_truncated, encode_pair, parse_preference_jsonl, parse_preference_line, PairSample};
use hone::data::{ChatTemplate, Tokenizer};
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::lora::LoraConfig;
use hone::model::load_model;
use hone::ops::HoneBackend;
use hone::parity::rel_error;
use hone::train::preference::{dpo_loss, pair_sequences, reference_logps, sequence_logps, split_pairs, DpoConfig, LossType, PairLogps};
use hone::train::{TrainConfig, Trainer};
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_slice(&std::fs::read(common::fixtures().join("preference/dpo.json")).unwrap()).unwrap()
}

fn chat() -> (Tokenizer, ChatTemplate) {
    let dir = Dir(common::fixtures().join("chat"));
    (Tokenizer::open(&dir).unwrap(), ChatTemplate::open(&dir).unwrap().expect("the fixture has a template"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn pair(v: &Value) -> PairSample {
    PairSample { prompt_ids: ids(&v["prompt_ids"]), chosen_ids: ids(&v["chosen_ids"]), rejected_ids: ids(&v["rejected_ids"]) }
}

fn encode_rows(rows: &Value) -> Vec<PairSample> {
    let (tok, template) = chat();
    rows.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let at = format!("case:{}", i + 1);
            let example = parse_preference_line(&row.to_string(), &at).unwrap();
            encode_pair(&example, &tok, Some(&template), template.eos_token.as_deref(), &at).unwrap()
        })
        .collect()
}

#[test]
fn pairs_tokenize_as_trl() {
    let f = fixture();
    let mut checked = 0;
    for (format, rows) in f["data"].as_object().unwrap() {
        let want: Vec<PairSample> = f["processed"][format].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(encode_rows(rows), want, "{format}");
        checked += want.len();
    }
    assert_eq!(checked, 8);
}

#[test]
fn max_length_drops_and_truncates_as_trl() {
    let f = fixture();
    let max_len = f["max_length"].as_u64().map(|m| m as usize);
    let mut pairs = encode_rows(&f["long"]);
    assert_eq!(drop_fully_truncated(&mut pairs, max_len), 1, "the pair whose prompt fills max_length");
    let want: Vec<PairSample> = f["long_processed"].as_array().unwrap().iter().map(pair).collect();
    assert_eq!(pairs, want);
    // The collator's rows (chosen ones, then rejected ones), without its padding.
    let sequences = pair_sequences(&pairs.iter().collect::<Vec<_>>(), max_len);
    let batch = &f["long_batch"];
    for (s, (row, mask)) in sequences.iter().zip(batch["input_ids"].as_array().unwrap().iter().zip(batch["completion_mask"].as_array().unwrap())) {
        let n = s.ids.len();
        assert_eq!(s.ids, ids(row)[..n]);
        let mask: Vec<bool> = mask.as_array().unwrap().iter().map(|m| m.as_u64() == Some(1)).collect();
        assert_eq!(s.completion, mask[..n]);
        assert!(mask[n..].iter().all(|m| !m), "only padding after the sequence");
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Policy (the given adapter, B scaled as the fixture scaled it) and reference (adapters off)
/// log-probabilities of the text pairs, then each loss's metrics.
fn check<B: HoneBackend>(device: &B::Device, label: &str) {
    let f = fixture();
    let pairs: Vec<PairSample> = f["processed"]["text"].as_array().unwrap().iter().map(pair).collect();
    let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), device).unwrap();
    let mut adapter = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
    let scale = f["policy_b_scale"].as_f64().unwrap() as f32;
    adapter.layers.iter_mut().for_each(|l| l.b.iter_mut().for_each(|b| *b *= scale));
    adapter.attach(model.linears_mut()).unwrap();

    let sequences = pair_sequences(&pairs.iter().collect::<Vec<_>>(), None);
    let read = |t: burn::tensor::Tensor<B, 1>| -> Vec<f64> { t.into_data().to_vec::<f32>().unwrap().into_iter().map(f64::from).collect() };
    let policy = split_pairs(&read(sequence_logps(&model, &sequences, 0)));
    let reference = split_pairs(&read(reference_logps(&model, &sequences, 0)));
    let want = |key: &str| -> Vec<f64> { f["pairs"][key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
    for (name, ours, side) in [("policy", &policy, "policy"), ("reference", &reference, "ref")] {
        for (i, (p, (c, r))) in ours.iter().zip(want(&format!("{side}_chosen")).into_iter().zip(want(&format!("{side}_rejected")))).enumerate() {
            println!("{label} pair {i} {name}: chosen {:.6} (TRL {c:.6}), rejected {:.6} (TRL {r:.6})", p.chosen, p.rejected);
            assert!(rel(p.chosen, c) < 1e-5 && rel(p.rejected, r) < 1e-5, "{label} pair {i} {name} log-probs");
        }
    }
    let lens: Vec<(usize, usize)> = {
        let n = pairs.len();
        (0..n).map(|i| (sequences[i].completion_len(), sequences[n + i].completion_len())).collect()
    };
    let beta = f["beta"].as_f64().unwrap();
    for (name, want) in f["losses"].as_object().unwrap() {
        let loss = dpo_loss(LossType::parse(name).unwrap(), beta, &policy, &reference, &lens);
        let ours = serde_json::to_value(loss.metrics).unwrap();
        for (key, w) in want.as_object().unwrap() {
            let (o, w) = (ours[key].as_f64().unwrap(), w.as_f64().unwrap());
            println!("{label} {name} {key}: {o:.7} (TRL {w:.7}, rel {:.1e}, abs {:.1e})", rel(o, w), (o - w).abs());
            // 1e-5 relative, or 1e-6 absolute for a mean that cancels to near zero (rewards/rejected
            // is 0.02 here, a mean of β·(±2-3)): the rewards are β times differences of f32
            // log-probabilities of ~40-90, whose own rounding is ~4e-6 (an ulp), in TRL's too.
            assert!(rel(o, w) < 1e-5 || (o - w).abs() < 1e-6, "{label} {name} {key}: {o} vs TRL {w}");
        }
    }
}

#[test]
fn dpo_log_probs_loss_and_rewards_equal_trl_on_the_cpu() {
    check::<NdArray>(&Default::default(), "cpu");
}

#[test]
fn dpo_log_probs_loss_and_rewards_equal_trl_on_wgpu() {
    check::<Wgpu>(&WgpuDevice::default(), "wgpu");
}

/// Three DPO steps from the given adapter (TRL's reference: a frozen copy of it), full batch,
/// constant lr, clipping at 1: TRL's losses, reward margins and final adapter.
fn dpo_steps<B: AutodiffBackend + HoneBackend>(device: &B::Device, label: &str, checkpointing: bool)
where
    B::InnerBackend: HoneBackend,
{
    let f = fixture();
    let tr = &f["train"];
    let pairs: Vec<[hone::data::preference::Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(|v| pair(v).sequences(None)).collect();
    let (model, lora) = common::llama_with_given_adapter::<B>(device);
    let dpo = DpoConfig { loss_type: LossType::parse(tr["loss_type"].as_str().unwrap()).unwrap(), beta: f["beta"].as_f64().unwrap() };
    let cfg = common::fixture_run(tr, dpo, checkpointing);
    let mut trainer = Trainer::new_preference(model, lora, pairs, None, cfg, device.clone()).unwrap();
    let (want_losses, want_margins) = (tr["losses"].as_array().unwrap(), tr["margins"].as_array().unwrap());
    for (want, margin) in want_losses.iter().zip(want_margins) {
        let r = trainer.step();
        let m = r.preference.expect("a DPO step reports TRL's metrics");
        let (want, margin) = (want.as_f64().unwrap(), margin.as_f64().unwrap());
        println!("{label} checkpointing={checkpointing} step {}: loss {:.7} (TRL {want:.7}), margin {:.7} (TRL {margin:.7})", r.step, r.loss, m.rewards_margins);
        assert!(rel(r.loss, want) < 1e-4, "{label} step {}: loss {} vs TRL {want}", r.step, r.loss);
        assert!((m.rewards_margins - margin).abs() < 1e-4 * margin.abs().max(1e-2), "{label} step {}: margin", r.step);
    }
    assert!(trainer.done());
    let trained = trainer.adapter("x");
    let worst = common::assert_adapter_equals(&trained, "preference/dpo_steps_adapter.safetensors", label);
    println!("{label} checkpointing={checkpointing}: {} layers, worst rel error of the final A/B {worst:.2e}", trained.layers.len());
    assert_eq!(trained.layers.len(), 14);
}

#[test]
fn three_dpo_steps_give_trls_adapter_on_the_cpu() {
    dpo_steps::<Autodiff<NdArray>>(&Default::default(), "cpu", true);
    dpo_steps::<Autodiff<NdArray>>(&Default::default(), "cpu", false);
}

#[test]
fn three_dpo_steps_give_trls_adapter_on_wgpu() {
    dpo_steps::<Autodiff<Wgpu>>(&WgpuDevice::default(), "wgpu", true);
}

/// Each loss's per-pair derivatives are its finite differences (the weights a training step
/// back-propagates).
#[test]
fn dpo_loss_derivatives_are_its_slopes() {
    let policy = vec![PairLogps { chosen: -20.0, rejected: -31.0 }, PairLogps { chosen: -12.5, rejected: -9.0 }];
    let reference = vec![PairLogps { chosen: -21.0, rejected: -30.0 }, PairLogps { chosen: -12.0, rejected: -9.5 }];
    let lens = [(5, 7), (3, 2)];
    for loss_type in [LossType::Sigmoid, LossType::Ipo, LossType::Hinge] {
        let at = |p: &[PairLogps]| dpo_loss(loss_type, 0.1, p, &reference, &lens).metrics.loss;
        let d = dpo_loss(loss_type, 0.1, &policy, &reference, &lens).d_logps;
        for i in 0..policy.len() {
            for side in 0..2 {
                let h = 1e-4;
                let moved = |dx: f64| {
                    let mut p = policy.clone();
                    if side == 0 { p[i].chosen += dx } else { p[i].rejected += dx }
                    at(&p)
                };
                let slope = (moved(h) - moved(-h)) / (2.0 * h);
                let ours = if side == 0 { d[i].chosen } else { d[i].rejected };
                assert!((ours - slope).abs() < 1e-6, "{loss_type:?} pair {i} side {side}: {ours} vs {slope}");
                assert!(ours != 0.0, "{loss_type:?}: these pairs are inside every loss's slope");
            }
        }
    }
}

#[test]
fn bad_pairs_name_file_and_line() {
    let (tok, _) = chat();
    let err = |text: &str| parse_preference_jsonl(text, "prefs.jsonl", false).unwrap_err().to_string();
    let ok = r#"{"prompt": "a", "chosen": " b", "rejected": " c"}"#;
    assert!(err(&format!("{ok}\n{{\"prompt\": \"a\", \"chosen\": \" b\"}}")).contains("prefs.jsonl:2"));
    assert!(err(&format!("{ok}\n{{\"prompt\": \"a\", \"chosen\": \" b\"}}")).contains("`rejected`"));
    let empty = err(&format!("{ok}\n\n{{\"prompt\": \"a\", \"chosen\": \"\", \"rejected\": \" c\"}}"));
    assert!(empty.contains("prefs.jsonl:3") && empty.contains("`chosen` is empty"), "{empty}");
    let mixed = err(r#"{"chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}"#);
    assert!(mixed.contains("prefs.jsonl:1") && mixed.contains("both"), "{mixed}");
    // Skipped and counted.
    let (pairs, skipped) = parse_preference_jsonl(&format!("{ok}\n{{\"chosen\": \"x\"}}\n{ok}"), "prefs.jsonl", true).unwrap();
    assert_eq!((pairs.len(), skipped), (2, 1));
    assert_eq!(pairs[1].0, "prefs.jsonl:3");
    // A conversational pair needs a chat template.
    let conv = parse_preference_line(r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]}"#, "prefs.jsonl:4").unwrap();
    let e = encode_pair(&conv, &tok, None, Some("<|end|>"), "prefs.jsonl:4").unwrap_err().to_string();
    assert!(e.contains("prefs.jsonl:4") && e.contains("chat template"), "{e}");
}

/// A DPO run stopped after one step, saved, and resumed from its checkpoint (whose reference
/// log-probabilities it uses instead of recomputing them from a model that has moved) equals
/// the uninterrupted run bit for bit: batches of 2 over 3 pairs, shuffled, across an epoch.
#[test]
fn a_resumed_dpo_run_equals_an_uninterrupted_one() {
    type B = Autodiff<NdArray>;
    use hone::train::checkpoint::{self, SavedState};
    let f = fixture();
    let device = Default::default();
    let trainer = |reference: Option<Vec<PairLogps>>| {
        let pairs: Vec<[hone::data::preference::Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(|v| pair(v).sequences(None)).collect();
        let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
        let adapter = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
        adapter.attach(model.linears_mut()).unwrap();
        let cfg = TrainConfig { lr: 5e-3, batch_size: 2, max_steps: Some(3), seed: 3, dpo: Some(DpoConfig { loss_type: LossType::Ipo, beta: 0.1 }), ..Default::default() };
        let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, ..Default::default() };
        Trainer::new_preference(model, lora, pairs, reference, cfg, device).unwrap()
    };
    let mut straight = trainer(None);
    let straight_losses: Vec<f64> = (0..3).map(|_| straight.step().loss).collect();

    let dir = std::env::temp_dir().join(format!("hone-dpo-ckpt-{}", std::process::id()));
    let mut first = trainer(None);
    let mut losses = vec![first.step().loss];
    let saved = SavedState {
        state: first.state.clone(),
        config: first.cfg.clone(),
        base_model: "llama".into(),
        best_eval_loss: None,
        best_step: None,
        evals_without_improvement: 0,
        reference_logps: first.reference_logps().to_vec(),
    };
    checkpoint::save(&dir, &first, &saved, None).unwrap();
    drop(first);
    let loaded = checkpoint::load(&dir).unwrap();
    assert_eq!(loaded.saved.reference_logps, straight.reference_logps(), "the reference survives the checkpoint exactly");
    let mut resumed = trainer(Some(loaded.saved.reference_logps.clone()));
    resumed.restore(&loaded.adapter, loaded.moments, loaded.saved.state).unwrap();
    while !resumed.done() {
        losses.push(resumed.step().loss);
    }
    assert_eq!(losses, straight_losses);
    assert_eq!(resumed.adapter("x").weights_bytes(), straight.adapter("x").weights_bytes(), "adapters differ");
    // A reference saved for other data is refused.
    let short = loaded.saved.reference_logps[..2].to_vec();
    let pairs: Vec<[hone::data::preference::Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(|v| pair(v).sequences(None)).collect();
    let model = load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let cfg = TrainConfig { dpo: Some(DpoConfig::default()), ..Default::default() };
    assert!(Trainer::new_preference(model, LoraConfig::default(), pairs, Some(short), cfg, device).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Gradient accumulation: a step over 2 micro-batches of 1 pair (each loss divided by the 2
/// steps, as transformers' Trainer divides it) moves the adapter as one micro-batch of both.
#[test]
fn dpo_accumulation_equals_one_bigger_batch() {
    type B = Autodiff<NdArray>;
    let f = fixture();
    let device = Default::default();
    let run = |batch_size: usize, grad_accum: usize| {
        let pairs: Vec<[hone::data::preference::Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().take(2).map(|v| pair(v).sequences(None)).collect();
        let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
        let adapter = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
        adapter.attach(model.linears_mut()).unwrap();
        let cfg = TrainConfig { lr: 5e-3, batch_size, grad_accum, max_steps: Some(2), shuffle: false, dpo: Some(DpoConfig::default()), ..Default::default() };
        let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, ..Default::default() };
        let mut t = Trainer::new_preference(model, lora, pairs, None, cfg, device).unwrap();
        let losses: Vec<f64> = (0..2).map(|_| t.step().loss).collect();
        (losses, t.adapter("x"))
    };
    let (one, one_adapter) = run(2, 1);
    let (two, two_adapter) = run(1, 2);
    for (a, b) in one.iter().zip(&two) {
        assert!(rel(*a, *b) < 1e-6, "losses {one:?} vs {two:?}");
    }
    for (x, y) in one_adapter.layers.iter().zip(&two_adapter.layers) {
        assert!(rel_error(&x.b, &y.b) < 1e-5 && rel_error(&x.a, &y.a) < 1e-5, "{}", x.module);
    }
    assert!(one[1] < one[0], "training lowered the loss: {one:?}");
}

/// Runs a future to completion on this thread (the CPU backend's reads are ready at once).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => return v,
            std::task::Poll::Pending => std::thread::park(),
        }
    }
}

/// The step the page takes (its log-probabilities read back without blocking, between the
/// untracked pass and the backward) is the native step, bit for bit: DPO and ORPO, with LoRA
/// dropout and two micro-batches per step.
#[test]
fn the_non_blocking_preference_step_equals_the_blocking_one() {
    type B = Autodiff<NdArray>;
    let f = fixture();
    let device = Default::default();
    for loss_type in [LossType::Sigmoid, LossType::Orpo] {
        let trainer = || {
            let pairs: Vec<[hone::data::preference::Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(|v| pair(v).sequences(None)).collect();
            let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
            let adapter = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
            adapter.attach(model.linears_mut()).unwrap();
            let cfg = TrainConfig { lr: 5e-3, batch_size: 1, grad_accum: 2, max_steps: Some(2), seed: 5, dpo: Some(DpoConfig { loss_type, beta: 0.1 }), ..Default::default() };
            assert!(cfg.checkpointing, "the default");
            let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.1, ..Default::default() };
            Trainer::new_preference(model, lora, pairs, None, cfg, device).unwrap()
        };
        let (mut blocking, mut page) = (trainer(), trainer());
        while !blocking.done() {
            let r = blocking.step();
            let p = block_on(page.step_pending_async()).unwrap();
            let loss = p.loss_sum.into_data().to_vec::<f32>().unwrap()[0] as f64;
            println!("{loss_type:?} step {}: loss {} / {loss}", r.step, r.loss);
            assert_eq!(r.loss, loss, "{loss_type:?} step {}", r.step);
            assert_eq!(r.preference, p.report.preference);
        }
        assert_eq!(blocking.adapter("x").weights_bytes(), page.adapter("x").weights_bytes(), "{loss_type:?}: adapters differ");
    }
}
