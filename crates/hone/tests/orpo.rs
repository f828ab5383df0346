//! ORPO equals TRL 1.16's ORPO trainer (`trl.experimental.orpo`;
//! tests/reference/make_orpo_fixtures.py): the tokenized sequences of each preference format and
//! their `max_length` truncation, on the tiny Llama with a given adapter each pair's mean
//! completion log-probabilities, the loss and TRL's metrics (CPU, wgpu), the loss's derivatives,
//! and three ORPO steps from that adapter giving TRL's adapter.

mod common;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use hone::data::preference::{encode_orpo_pair, parse_preference_line, truncate_orpo_pairs, Sequence};
use hone::data::{ChatTemplate, Tokenizer};
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::load_model;
use hone::ops::HoneBackend;
use hone::train::preference::{orpo_loss, pair_sums, preference_loss, DpoConfig, LossType, PairLogps};
use hone::train::Trainer;
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_slice(&std::fs::read(common::fixtures().join("preference/orpo.json")).unwrap()).unwrap()
}

fn dpo_fixture() -> Value {
    serde_json::from_slice(&std::fs::read(common::fixtures().join("preference/dpo.json")).unwrap()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A TRL row's sequence: its ids, the completion where the labels are not -100.
fn sequence(ids_v: &Value, labels_v: &Value) -> Sequence {
    let (ids, labels) = (ids(ids_v), ids(labels_v));
    assert_eq!(ids.len(), labels.len());
    Sequence { ids: ids.iter().map(|&i| i as u32).collect(), completion: labels.iter().map(|&l| l != -100).collect() }
}

fn trl_pair(v: &Value) -> [Sequence; 2] {
    [sequence(&v["chosen_input_ids"], &v["chosen_labels"]), sequence(&v["rejected_input_ids"], &v["rejected_labels"])]
}

fn encode_rows(rows: &Value) -> Vec<[Sequence; 2]> {
    let dir = Dir(common::fixtures().join("chat"));
    let (tok, template) = (Tokenizer::open(&dir).unwrap(), ChatTemplate::open(&dir).unwrap().expect("the fixture has a template"));
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t));
    let (bos, eos) = (id(&template.bos_token), id(&template.eos_token));
    rows.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let at = format!("case:{}", i + 1);
            encode_orpo_pair(&parse_preference_line(&row.to_string(), &at).unwrap(), &tok, Some(&template), bos, eos, &at).unwrap()
        })
        .collect()
}

#[test]
fn orpo_pairs_tokenize_as_trl() {
    let (f, data) = (fixture(), dpo_fixture());
    let mut checked = 0;
    for (format, rows) in data["data"].as_object().unwrap() {
        let want: Vec<[Sequence; 2]> = f["processed"][format].as_array().unwrap().iter().map(trl_pair).collect();
        assert_eq!(encode_rows(rows), want, "{format}");
        checked += want.len();
    }
    assert_eq!(checked, 8);
}

#[test]
fn orpo_max_length_drops_and_truncates_as_trl() {
    let (f, data) = (fixture(), dpo_fixture());
    let max_len = f["max_length"].as_u64().map(|m| m as usize);
    let mut pairs = encode_rows(&data["long"]);
    // TRL keeps the second pair with no completion token (its prompt alone is past the limit) and
    // an untruncated prompt; hone drops it.
    assert_eq!(truncate_orpo_pairs(&mut pairs, max_len), 1);
    let long = f["long_processed"].as_array().unwrap();
    assert!(long[1]["chosen_labels"].as_array().unwrap().iter().all(|l| l.as_i64() == Some(-100)));
    assert_eq!(pairs, vec![trl_pair(&long[0]), trl_pair(&long[2])]);
    assert!(pairs.iter().flatten().all(|s| s.ids.len() <= 8));
}

fn metrics<B: HoneBackend>(device: &B::Device, label: &str) {
    let f = fixture();
    let pairs: Vec<[Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(trl_pair).collect();
    let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), device).unwrap();
    let mut adapter = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
    let scale = f["policy_b_scale"].as_f64().unwrap() as f32;
    adapter.layers.iter_mut().for_each(|l| l.b.iter_mut().for_each(|b| *b *= scale));
    adapter.attach(model.linears_mut()).unwrap();

    let sums = pair_sums(&model, &pairs, true, 2, 0);
    let want = |key: &str| -> Vec<f64> { f["pairs"][key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
    for (i, ((s, p), (c, r))) in sums.completion.iter().zip(&pairs).zip(want("chosen").into_iter().zip(want("rejected"))).enumerate() {
        let (mc, mr) = (s.chosen / p[0].completion_len() as f64, s.rejected / p[1].completion_len() as f64);
        println!("{label} pair {i}: mean logps chosen {mc:.7} (TRL {c:.7}), rejected {mr:.7} (TRL {r:.7})");
        assert!(rel(mc, c) < 1e-5 && rel(mr, r) < 1e-5, "{label} pair {i}");
    }
    let lens: Vec<(usize, usize)> = pairs.iter().map(|[c, r]| (c.completion_len(), r.completion_len())).collect();
    let loss = preference_loss(DpoConfig { loss_type: LossType::Orpo, beta: f["beta"].as_f64().unwrap() }, &sums, &[], &lens);
    let ours = serde_json::to_value(loss.metrics).unwrap();
    let theirs = f["metrics"].as_object().unwrap();
    assert_eq!(theirs.len(), 10, "loss and the nine metrics besides TRL's logits means");
    for (key, w) in theirs {
        let (o, w) = (ours[key].as_f64().unwrap_or_else(|| panic!("{key} missing")), w.as_f64().unwrap());
        println!("{label} {key}: {o:.7} (TRL {w:.7}, rel {:.1e})", rel(o, w));
        // Accuracy is 0 in both; everything else well away from zero.
        assert!(rel(o, w) < 1e-5 || (o == 0.0 && w == 0.0), "{label} {key}: {o} vs TRL {w}");
    }
}

#[test]
fn orpo_loss_and_metrics_equal_trl_on_the_cpu() {
    metrics::<NdArray>(&Default::default(), "cpu");
}

#[test]
fn orpo_loss_and_metrics_equal_trl_on_wgpu() {
    metrics::<Wgpu>(&WgpuDevice::default(), "wgpu");
}

/// ORPO's per-pair derivatives and its NLL weight are the loss's finite differences.
#[test]
fn orpo_loss_derivatives_are_its_slopes() {
    let sums = vec![PairLogps { chosen: -20.0, rejected: -31.0 }, PairLogps { chosen: -1.5, rejected: -0.9 }];
    let lens = [(5, 7), (3, 2)];
    let (nll, tokens) = (57.0, 19);
    let at = |p: &[PairLogps], nll: f64| orpo_loss(0.3, p, &lens, nll, tokens).metrics.loss;
    let d = orpo_loss(0.3, &sums, &lens, nll, tokens);
    let h = 1e-5;
    for i in 0..sums.len() {
        for side in 0..2 {
            let moved = |dx: f64| {
                let mut p = sums.clone();
                if side == 0 { p[i].chosen += dx } else { p[i].rejected += dx }
                at(&p, nll)
            };
            let slope = (moved(h) - moved(-h)) / (2.0 * h);
            let ours = if side == 0 { d.d_logps[i].chosen } else { d.d_logps[i].rejected };
            assert!((ours - slope).abs() < 1e-7 && ours != 0.0, "pair {i} side {side}: {ours} vs {slope}");
        }
    }
    let slope = (at(&sums, nll + h) - at(&sums, nll - h)) / (2.0 * h);
    assert!((d.d_chosen_nll - slope).abs() < 1e-9, "{} vs {slope}", d.d_chosen_nll);
}

/// Three ORPO steps from the given adapter, full batch, constant lr, clipping at 1: TRL's
/// losses and NLLs, and its final adapter.
fn orpo_steps<B: AutodiffBackend + HoneBackend>(device: &B::Device, label: &str, checkpointing: bool)
where
    B::InnerBackend: HoneBackend,
{
    let f = fixture();
    let tr = &f["train"];
    let pairs: Vec<[Sequence; 2]> = f["processed"]["text"].as_array().unwrap().iter().map(trl_pair).collect();
    let (model, lora) = common::llama_with_given_adapter::<B>(device);
    let cfg = common::fixture_run(tr, DpoConfig { loss_type: LossType::Orpo, beta: f["beta"].as_f64().unwrap() }, checkpointing);
    let mut trainer = Trainer::new_preference(model, lora, pairs, None, cfg, device.clone()).unwrap();
    assert!(trainer.reference_logps().is_empty(), "ORPO has no reference");
    for (want, nll) in tr["losses"].as_array().unwrap().iter().zip(tr["nll_loss"].as_array().unwrap()) {
        let r = trainer.step();
        let m = r.preference.expect("an ORPO step reports TRL's metrics");
        let (want, nll) = (want.as_f64().unwrap(), nll.as_f64().unwrap());
        let ours = m.nll_loss.expect("ORPO's NLL");
        println!("{label} checkpointing={checkpointing} step {}: loss {:.7} (TRL {want:.7}), nll {ours:.7} (TRL {nll:.7})", r.step, r.loss);
        assert!(rel(r.loss, want) < 1e-4 && rel(ours, nll) < 1e-4, "{label} step {}: loss {} vs TRL {want}", r.step, r.loss);
    }
    let trained = trainer.adapter("x");
    let worst = common::assert_adapter_equals(&trained, "preference/orpo_steps_adapter.safetensors", label);
    println!("{label} checkpointing={checkpointing}: {} layers, worst rel error of the final A/B {worst:.2e}", trained.layers.len());
    assert_eq!(trained.layers.len(), 14);
}

#[test]
fn three_orpo_steps_give_trls_adapter_on_the_cpu() {
    orpo_steps::<Autodiff<NdArray>>(&Default::default(), "cpu", true);
    orpo_steps::<Autodiff<NdArray>>(&Default::default(), "cpu", false);
}

#[test]
fn three_orpo_steps_give_trls_adapter_on_wgpu() {
    orpo_steps::<Autodiff<Wgpu>>(&WgpuDevice::default(), "wgpu", true);
}
