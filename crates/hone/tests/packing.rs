//! Packing and token-budget micro-batches. Packed rows give the loss and gradients of the same
//! samples padded one per row (positions restart at each sample, no attention across samples);
//! budgets bound every micro-batch's padded size.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::Tensor;
use hone::data::Sample;
use hone::lora::peft::add_adapters;
use hone::lora::{LoraConfig, Targets};
use hone::model::{load_model_with, LoadOptions};
use hone::parity::rel_error;
use hone::train::trainer::{micro_batch, Batch};
use hone::train::{TrainConfig, Trainer};

type B = Autodiff<NdArray>;

fn sample(len: usize, salt: usize, prompt: usize) -> Sample {
    let ids: Vec<u32> = (0..len).map(|i| ((i * 13 + salt * 5 + 1) % 50) as u32).collect();
    let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt { -100 } else { t as i64 }).collect();
    Sample { input_ids: ids, labels }
}

fn trainer(checkpointing: bool, sliding_window: bool) -> Trainer<B> {
    let extra = if sliding_window { serde_json::json!({"model_type": "mistral", "sliding_window": 4}) } else { serde_json::json!({}) };
    let shape = common::Synthetic { hidden: 32, inter: 64, layers: 2, vocab: 50, heads: 4, max_positions: 64 }.files_with(extra);
    let device = Default::default();
    let mut model = load_model_with::<B>(&shape, LoadOptions { nf4: None }, &device).unwrap();
    let lora = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 5 };
    add_adapters(model.linears_mut(), &lora);
    common::randomize_lora_b(&mut model, 0.2, &device);
    Trainer::new(model, lora, Vec::new(), TrainConfig { checkpointing, ..Default::default() }, device)
}

fn host(out: (Tensor<NdArray, 1>, Vec<(String, Tensor<NdArray, 2>)>)) -> (f32, Vec<Vec<f32>>) {
    (out.0.into_data().to_vec::<f32>().unwrap()[0], out.1.into_iter().map(|(_, g)| g.into_data().to_vec::<f32>().unwrap()).collect())
}

#[test]
fn packed_rows_equal_padded_rows() {
    let samples = [sample(9, 0, 3), sample(5, 1, 0), sample(12, 2, 4), sample(7, 3, 2), sample(3, 4, 1)];
    let refs: Vec<&Sample> = samples.iter().collect();
    for (checkpointing, window) in [(false, false), (true, false), (true, true)] {
        let t = trainer(checkpointing, window);
        let padded = Batch::padded(&refs, 0);
        // Two rows: 9+5+7 = 21 tokens, then 12+3 = 15 (padded to 21).
        let packed = Batch::packed(&[vec![refs[0], refs[1], refs[3]], vec![refs[2], refs[4]]], 0);
        assert_eq!(packed.seq_len(), 21);
        let (loss_a, grads_a) = host(t.gradients(&padded, 1.0, 0));
        let (loss_b, grads_b) = host(t.gradients(&packed, 1.0, 0));
        println!("checkpointing={checkpointing} window={window}: loss {loss_a} padded, {loss_b} packed");
        assert!((loss_a - loss_b).abs() < 1e-5 * loss_a.abs(), "loss {loss_a} vs {loss_b}");
        for (a, b) in grads_a.iter().zip(&grads_b) {
            let err = rel_error(b, a);
            assert!(err < 1e-4, "gradient rel error {err:.2e}");
        }
    }
}

#[test]
fn packing_ignores_the_first_label_of_each_sample() {
    let a = sample(4, 0, 0);
    let b = sample(3, 1, 0);
    let packed = Batch::packed(&[vec![&a, &b]], 0);
    assert_eq!(packed.labels[0][0], -100);
    assert_eq!(packed.labels[0][4], -100, "the token before b is a's, so b's first label is not predicted");
    assert_eq!(packed.labels[0][5], b.labels[1]);
}

#[test]
fn micro_batches_respect_the_token_budget() {
    let lens = [10, 30, 5, 20, 20, 8, 40, 3];
    let order: Vec<usize> = (0..lens.len()).collect();
    let walk = |cfg: &TrainConfig| {
        let mut at = 0;
        let mut out = Vec::new();
        while at < order.len() {
            let (rows, next) = micro_batch(cfg, &lens, &order, at);
            out.push(rows);
            at = next;
        }
        out
    };
    // Padded rows: rows × longest <= 60, each sample once, in order.
    let cfg = TrainConfig { max_batch_tokens: Some(60), ..Default::default() };
    let batches = walk(&cfg);
    assert_eq!(batches, vec![vec![vec![0], vec![1]], vec![vec![2], vec![3], vec![4]], vec![vec![5]], vec![vec![6]], vec![vec![7]]]);
    for b in &batches {
        let longest = b.iter().map(|r| lens[r[0]]).max().unwrap();
        assert!(b.len() * longest <= 60 || b.len() == 1);
    }
    // Packed rows of 40 tokens, at most 80 tokens per micro-batch (two rows).
    let cfg = TrainConfig { pack_len: Some(40), max_batch_tokens: Some(80), ..Default::default() };
    let batches = walk(&cfg);
    assert_eq!(batches, vec![vec![vec![0, 1], vec![2, 3]], vec![vec![4, 5], vec![6]], vec![vec![7]]]);
    // Without a budget: batch_size rows.
    let cfg = TrainConfig { batch_size: 3, ..Default::default() };
    assert_eq!(walk(&cfg).iter().map(|b| b.len()).collect::<Vec<_>>(), vec![3, 3, 2]);
}
