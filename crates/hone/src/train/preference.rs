//! Preference tuning's pieces as TRL 1.16's DPOTrainer computes them: each sequence's
//! log-probability summed over its completion tokens, the reference's (the frozen base, the
//! adapters switched off), the losses `sigmoid` (DPO), `ipo` (length-normalised, as TRL) and
//! `hinge`, and TRL's reward metrics under TRL's names.
//!
//! The loss is a function of per-sequence log-probabilities alone, so its gradient is a weighted
//! sum of their gradients: [`DpoLoss`] gives each pair's `dloss/dlogp`, which a weighted token
//! loss turns into the LoRA gradients.

use crate::data::preference::{PairSample, Sequence};
use crate::model::CausalLm;
use crate::ops::HoneBackend;
use crate::data::Sample;
use crate::train::loss::shifted_targets;
use crate::train::trainer::{nll_rows_chunked, pad_batch, LOGITS_CHUNK};
use burn::tensor::{Int, Tensor, TensorData};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
}

impl LossType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sigmoid" => LossType::Sigmoid,
            "ipo" => LossType::Ipo,
            "hinge" => LossType::Hinge,
            _ => return None,
        })
    }
}

/// What a preference run optimises: the loss and DPO's β (TRL's defaults: sigmoid, 0.1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoConfig {
    pub loss_type: LossType,
    pub beta: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { loss_type: LossType::Sigmoid, beta: 0.1 }
    }
}

/// Summed completion log-probabilities of one pair's two sequences.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
}

/// TRL's logged metrics for a batch of pairs (means over the pairs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DpoMetrics {
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

/// The batch's loss and metrics, and for each pair the loss's derivative with respect to the
/// policy's chosen and rejected log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoLoss {
    pub metrics: DpoMetrics,
    pub d_logps: Vec<PairLogps>,
}

/// The mean loss over pairs, as TRL: `policy` and `reference` log-probabilities per pair,
/// `completion_lens` (chosen, rejected) for IPO.
pub fn dpo_loss(loss_type: LossType, beta: f64, policy: &[PairLogps], reference: &[PairLogps], completion_lens: &[(usize, usize)]) -> DpoLoss {
    let n = policy.len();
    assert!(n > 0 && reference.len() == n && completion_lens.len() == n, "one reference and one length pair per pair");
    let mean = |f: &dyn Fn(usize) -> f64| (0..n).map(f).sum::<f64>() / n as f64;
    let mut loss = 0.0;
    let mut d_logps = Vec::with_capacity(n);
    for i in 0..n {
        let chosen = policy[i].chosen - reference[i].chosen;
        let rejected = policy[i].rejected - reference[i].rejected;
        let delta = chosen - rejected;
        // (loss, dloss/dchosen, dloss/drejected) of this pair.
        let (l, dc, dr) = match loss_type {
            LossType::Sigmoid => {
                let z = beta * delta;
                let d = -beta * sigmoid(-z);
                (-log_sigmoid(z), d, -d)
            }
            LossType::Hinge => {
                let m = 1.0 - beta * delta;
                if m > 0.0 {
                    (m, -beta, beta)
                } else {
                    (0.0, 0.0, 0.0)
                }
            }
            LossType::Ipo => {
                let (nc, nr) = (completion_lens[i].0.max(1) as f64, completion_lens[i].1.max(1) as f64);
                let e = chosen / nc - rejected / nr - 1.0 / (2.0 * beta);
                (e * e, 2.0 * e / nc, -2.0 * e / nr)
            }
        };
        loss += l / n as f64;
        d_logps.push(PairLogps { chosen: dc / n as f64, rejected: dr / n as f64 });
    }
    let reward = |i: usize| (beta * (policy[i].chosen - reference[i].chosen), beta * (policy[i].rejected - reference[i].rejected));
    let metrics = DpoMetrics {
        loss,
        rewards_chosen: mean(&|i| reward(i).0),
        rewards_rejected: mean(&|i| reward(i).1),
        rewards_accuracies: mean(&|i| if reward(i).0 > reward(i).1 { 1.0 } else { 0.0 }),
        rewards_margins: mean(&|i| reward(i).0 - reward(i).1),
        logps_chosen: mean(&|i| policy[i].chosen),
        logps_rejected: mean(&|i| policy[i].rejected),
    };
    DpoLoss { metrics, d_logps }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `log σ(x)`, without overflow for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// A batch of pairs as TRL lays it out: every chosen sequence, then every rejected one, each cut
/// to `max_len`.
pub fn pair_sequences(pairs: &[&PairSample], max_len: Option<usize>) -> Vec<Sequence> {
    let both: Vec<[Sequence; 2]> = pairs.iter().map(|p| p.sequences(max_len)).collect();
    let (chosen, rejected): (Vec<Sequence>, Vec<Sequence>) = both.into_iter().map(|[c, r]| (c, r)).unzip();
    chosen.into_iter().chain(rejected).collect()
}

/// The loss's gradient as weights on each row's summed token loss (`nll = −logp`, so a row's
/// weight is `−dloss/dlogp`), for a batch laid out by [`pair_sequences`]; `scale` divides them
/// (gradient accumulation).
pub fn row_weights(loss: &DpoLoss, scale: f64) -> Vec<f32> {
    let chosen = loss.d_logps.iter().map(|d| -d.chosen / scale);
    let rejected = loss.d_logps.iter().map(|d| -d.rejected / scale);
    chosen.chain(rejected).map(|w| w as f32).collect()
}

/// Each sequence's summed completion log-probability under `model`, `[sequences]` (on the
/// head's device); logits are made a few positions at a time.
pub fn sequence_logps<B: HoneBackend>(model: &CausalLm<B>, sequences: &[Sequence], pad: u32, device: &B::Device) -> Tensor<B, 1> {
    let samples: Vec<Sample> = sequences.iter().map(Sequence::sample).collect();
    let (ids, labels) = pad_batch(&samples.iter().collect::<Vec<_>>(), pad);
    let targets = shifted_targets(&labels);
    let (rows, t) = (ids.len(), ids.first().map_or(0, |r| r.len()));
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.concat(), [rows, t]), device);
    nll_rows_chunked(model, model.hidden(ids), &targets, LOGITS_CHUNK).neg()
}

/// Every pair's log-probabilities under `model`, `batch` pairs at a time (native: reads each
/// batch back). With the model a run starts from, these are its reference.
#[cfg(not(target_arch = "wasm32"))]
pub fn pair_logps<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], batch: usize, pad: u32, device: &B::Device) -> Vec<PairLogps> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let sequences: Vec<Sequence> = chunk.iter().map(|p| p[0].clone()).chain(chunk.iter().map(|p| p[1].clone())).collect();
        let logps: Vec<f64> = sequence_logps(model, &sequences, pad, device).into_data().iter::<f32>().map(f64::from).collect();
        out.extend(split_pairs(&logps));
    }
    out
}

/// The loss and TRL's metrics of `model` on held-out `pairs` against their `reference`
/// log-probabilities (native).
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate_preference<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], reference: &[PairLogps], dpo: DpoConfig, batch: usize, pad: u32, device: &B::Device) -> DpoMetrics {
    let policy = pair_logps(model, pairs, batch, pad, device);
    let lens: Vec<(usize, usize)> = pairs.iter().map(|[c, r]| (c.completion_len(), r.completion_len())).collect();
    dpo_loss(dpo.loss_type, dpo.beta, &policy, reference, &lens).metrics
}

/// Per pair, the log-probabilities of a batch laid out by [`pair_sequences`] (`[2 × pairs]`
/// values, chosen first).
pub fn split_pairs(logps: &[f64]) -> Vec<PairLogps> {
    let n = logps.len() / 2;
    (0..n).map(|i| PairLogps { chosen: logps[i], rejected: logps[n + i] }).collect()
}

/// The reference's log-probabilities: the same model with its adapters switched off.
pub fn reference_logps<B: HoneBackend>(model: &CausalLm<B>, sequences: &[Sequence], pad: u32, device: &B::Device) -> Tensor<B, 1> {
    crate::lora::linear::without_adapters(|| sequence_logps(model, sequences, pad, device))
}
