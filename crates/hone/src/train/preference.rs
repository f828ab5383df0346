//! Preference tuning's pieces as TRL 1.16 computes them: each sequence's log-probability summed
//! over its completion tokens, the reference's (the frozen base, the adapters switched off), the
//! DPOTrainer's losses `sigmoid` (DPO), `ipo` (length-normalised, as TRL) and `hinge`; ORPO as
//! TRL's ORPO trainer (no reference: the chosen sequences' token NLL, prompt included, minus β
//! times the log-sigmoid of the log odds ratio of the completions' mean log-probabilities); and
//! TRL's metrics under TRL's names.
//!
//! Each loss is a function of per-sequence sums of token log-probabilities (over the completion,
//! and for ORPO's NLL over the whole sequence), so its gradient is a weighted sum of their
//! gradients: [`DpoLoss`] gives each pair's `dloss/dlogp`, which a weighted token loss turns into
//! the LoRA gradients.

use crate::data::preference::{PairSample, Sequence};
use crate::model::CausalLm;
use crate::ops::HoneBackend;
use crate::train::loss::shifted_targets;
use crate::train::trainer::{id_rows, nll_parts_chunked, Batch, LOGITS_CHUNK};
use burn::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    /// ORPO (TRL's ORPO trainer), `--method orpo`.
    Orpo,
}

impl LossType {
    /// Whether the loss compares with a reference model (ORPO does not).
    pub fn needs_reference(self) -> bool {
        self != LossType::Orpo
    }

    /// Whether the sequences' every token is predicted too (ORPO's NLL), not only the completion.
    pub fn whole_sequences(self) -> bool {
        self == LossType::Orpo
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sigmoid" => LossType::Sigmoid,
            "ipo" => LossType::Ipo,
            "hinge" => LossType::Hinge,
            _ => return None,
        })
    }
}

/// What a preference run optimises: the loss and its β (TRL's defaults: sigmoid, 0.1; ORPO's λ,
/// which TRL calls β too, defaults to 0.1 as well).
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

/// TRL's logged metrics for a batch of pairs (means over the pairs). ORPO's rewards are β times
/// the completions' mean log-probabilities, and it logs three more.
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
    /// ORPO: the chosen sequences' mean token NLL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll_loss: Option<f64>,
    /// ORPO: mean `log σ(log odds)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_odds_ratio: Option<f64>,
    /// ORPO: mean log odds ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_odds_chosen: Option<f64>,
}

/// The batch's loss and metrics, for each pair the loss's derivative with respect to the
/// policy's chosen and rejected (summed completion) log-probabilities, and with respect to the
/// chosen sequences' summed whole-sequence NLL (ORPO; 0 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct DpoLoss {
    pub metrics: DpoMetrics,
    pub d_logps: Vec<PairLogps>,
    pub d_chosen_nll: f64,
}

/// A batch's per-pair sums under the policy: completion log-probabilities (`completion`), the
/// whole sequences' (`whole`, ORPO's NLL), and the chosen sequences' predicted-token count.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySums {
    pub completion: Vec<PairLogps>,
    pub whole: Vec<PairLogps>,
    pub chosen_tokens: usize,
}

/// The loss `cfg` names on a batch of pairs; `reference` is unused (may be empty) for ORPO.
pub fn preference_loss(cfg: DpoConfig, policy: &PolicySums, reference: &[PairLogps], completion_lens: &[(usize, usize)]) -> DpoLoss {
    match cfg.loss_type {
        LossType::Orpo => {
            let chosen_nll = -policy.whole.iter().map(|w| w.chosen).sum::<f64>();
            orpo_loss(cfg.beta, &policy.completion, completion_lens, chosen_nll, policy.chosen_tokens)
        }
        t => dpo_loss(t, cfg.beta, &policy.completion, reference, completion_lens),
    }
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
            LossType::Orpo => panic!("ORPO is orpo_loss"),
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
        nll_loss: None,
        log_odds_ratio: None,
        log_odds_chosen: None,
    };
    DpoLoss { metrics, d_logps, d_chosen_nll: 0.0 }
}

/// ORPO's loss as TRL's ORPO trainer: `chosen_nll / chosen_tokens − β · mean log σ(log odds)`,
/// the odds of each completion's mean log-probability `a`: `log odds = (a_c − a_r) −
/// (log(1 − e^a_c) − log(1 − e^a_r))`. `sums` are the completions' summed log-probabilities,
/// `completion_lens` their token counts; `chosen_nll` is summed over every predicted token of
/// the chosen sequences (`chosen_tokens` of them).
pub fn orpo_loss(beta: f64, sums: &[PairLogps], completion_lens: &[(usize, usize)], chosen_nll: f64, chosen_tokens: usize) -> DpoLoss {
    let n = sums.len();
    assert!(n > 0 && completion_lens.len() == n, "one length pair per pair");
    let tokens = chosen_tokens.max(1) as f64;
    let mean_logps: Vec<(f64, f64)> = (0..n).map(|i| (sums[i].chosen / completion_lens[i].0.max(1) as f64, sums[i].rejected / completion_lens[i].1.max(1) as f64)).collect();
    let mut d_logps = Vec::with_capacity(n);
    let (mut ratio_sum, mut odds_sum) = (0.0, 0.0);
    for (i, &(ac, ar)) in mean_logps.iter().enumerate() {
        let odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
        ratio_sum += log_sigmoid(odds);
        odds_sum += odds;
        // d(−β log σ(odds)/n)/d odds, then d odds/da = 1/(1 − e^a) (and its negative for the
        // rejected), then da/dsum = 1/len.
        let g = -beta * sigmoid(-odds) / n as f64;
        let (nc, nr) = (completion_lens[i].0.max(1) as f64, completion_lens[i].1.max(1) as f64);
        d_logps.push(PairLogps { chosen: g / (-ac.exp_m1()) / nc, rejected: -g / (-ar.exp_m1()) / nr });
    }
    let mean = |f: &dyn Fn(&(f64, f64)) -> f64| mean_logps.iter().map(f).sum::<f64>() / n as f64;
    let nll = chosen_nll / tokens;
    let metrics = DpoMetrics {
        loss: nll - beta * ratio_sum / n as f64,
        rewards_chosen: mean(&|&(c, _)| beta * c),
        rewards_rejected: mean(&|&(_, r)| beta * r),
        rewards_accuracies: mean(&|&(c, r)| if beta * c > beta * r { 1.0 } else { 0.0 }),
        rewards_margins: mean(&|&(c, r)| beta * c - beta * r),
        logps_chosen: mean(&|&(c, _)| c),
        logps_rejected: mean(&|&(_, r)| r),
        nll_loss: Some(nll),
        log_odds_ratio: Some(ratio_sum / n as f64),
        log_odds_chosen: Some(odds_sum / n as f64),
    };
    DpoLoss { metrics, d_logps, d_chosen_nll: 1.0 / tokens }
}

/// `log(1 − e^x)` for `x < 0`, without cancellation (branching at −ln 2, as TRL).
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
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

/// The loss's gradient as weights on each row's summed token losses, for a batch laid out by
/// [`pair_sequences`]: `[2 × rows]`, first each row's weight on its completion tokens
/// (`nll = −logp`, so `−dloss/dlogp`), then each row's weight on all its predicted tokens
/// (ORPO's NLL); `scale` divides them (gradient accumulation).
pub fn row_weights(loss: &DpoLoss, scale: f64) -> Vec<f32> {
    let chosen = loss.d_logps.iter().map(|d| -d.chosen);
    let rejected = loss.d_logps.iter().map(|d| -d.rejected);
    let whole = loss.d_logps.iter().map(|_| loss.d_chosen_nll).chain(loss.d_logps.iter().map(|_| 0.0));
    chosen.chain(rejected).chain(whole).map(|w| (w / scale) as f32).collect()
}

/// Per pair, the sums of a batch laid out by [`pair_sequences`] from `[2 × rows]` log-probability
/// sums (completions, then whole sequences).
pub fn policy_sums(logps: &[f64], chosen_tokens: usize) -> PolicySums {
    let rows = logps.len() / 2;
    PolicySums { completion: split_pairs(&logps[..rows]), whole: split_pairs(&logps[rows..]), chosen_tokens }
}

/// Each sequence's summed log-probabilities under `model`, `[2 × sequences]`: over its
/// completion, then over every predicted token when `whole` (else the completion's again). On
/// the head's device; logits are made a few positions at a time.
pub fn sequence_sums<B: HoneBackend>(model: &CausalLm<B>, sequences: &[Sequence], whole: bool, pad: u32) -> Tensor<B, 1> {
    let batch = Batch::sequences(&sequences.iter().collect::<Vec<_>>(), whole, pad);
    let (targets, completion) = (shifted_targets(&batch.labels), batch.shifted_completion());
    nll_parts_chunked(model, model.hidden(&id_rows(&batch.ids)), &targets, &completion, LOGITS_CHUNK).neg()
}

/// Each sequence's summed completion log-probability under `model`, `[sequences]`.
pub fn sequence_logps<B: HoneBackend>(model: &CausalLm<B>, sequences: &[Sequence], pad: u32) -> Tensor<B, 1> {
    sequence_sums(model, sequences, false, pad).narrow(0, 0, sequences.len())
}

/// Every pair's sums under `model`, `batch` pairs at a time (native: reads each batch back).
#[cfg(not(target_arch = "wasm32"))]
pub fn pair_sums<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], whole: bool, batch: usize, pad: u32) -> PolicySums {
    let mut logps = Vec::new();
    for chunk in pairs.chunks(batch.max(1)) {
        logps.push(sequence_sums(model, &pair_rows(chunk), whole, pad).into_data().iter::<f32>().map(f64::from).collect());
    }
    gather_sums(pairs, &logps, whole)
}

/// [`pair_sums`] reading back without blocking (the page).
pub async fn pair_sums_async<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], whole: bool, batch: usize, pad: u32) -> crate::Result<PolicySums> {
    let mut logps = Vec::new();
    for chunk in pairs.chunks(batch.max(1)) {
        logps.push(crate::readback::read_f32(sequence_sums(model, &pair_rows(chunk), whole, pad)).await?.into_iter().map(f64::from).collect());
    }
    Ok(gather_sums(pairs, &logps, whole))
}

/// A chunk of pairs as batch rows: every chosen sequence, then every rejected one.
fn pair_rows(chunk: &[[Sequence; 2]]) -> Vec<Sequence> {
    chunk.iter().map(|p| p[0].clone()).chain(chunk.iter().map(|p| p[1].clone())).collect()
}

/// Every pair's sums from each chunk's `[2 × rows]` values.
fn gather_sums(pairs: &[[Sequence; 2]], chunks: &[Vec<f64>], whole: bool) -> PolicySums {
    let mut out = PolicySums { completion: Vec::with_capacity(pairs.len()), whole: Vec::with_capacity(pairs.len()), chosen_tokens: 0 };
    for logps in chunks {
        let sums = policy_sums(logps, 0);
        out.completion.extend(sums.completion);
        out.whole.extend(sums.whole);
    }
    out.chosen_tokens = pairs.iter().map(|p| if whole { p[0].ids.len().saturating_sub(1) } else { p[0].completion_len() }).sum();
    out
}

/// Every pair's summed completion log-probabilities under `model`. With the model a run starts
/// from, these are its reference.
#[cfg(not(target_arch = "wasm32"))]
pub fn pair_logps<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], batch: usize, pad: u32) -> Vec<PairLogps> {
    pair_sums(model, pairs, false, batch, pad).completion
}

/// The loss and TRL's metrics of `model` on held-out `pairs` against their `reference`
/// log-probabilities (empty for ORPO), over all the pairs at once (native).
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate_preference<B: HoneBackend>(model: &CausalLm<B>, pairs: &[[Sequence; 2]], reference: &[PairLogps], dpo: DpoConfig, batch: usize, pad: u32) -> DpoMetrics {
    let policy = pair_sums(model, pairs, dpo.loss_type.whole_sequences(), batch, pad);
    let lens: Vec<(usize, usize)> = pairs.iter().map(|[c, r]| (c.completion_len(), r.completion_len())).collect();
    preference_loss(dpo, &policy, reference, &lens).metrics
}

/// Per pair, the log-probabilities of a batch laid out by [`pair_sequences`] (`[2 × pairs]`
/// values, chosen first).
pub fn split_pairs(logps: &[f64]) -> Vec<PairLogps> {
    let n = logps.len() / 2;
    (0..n).map(|i| PairLogps { chosen: logps[i], rejected: logps[n + i] }).collect()
}

/// The reference's log-probabilities: the same model with its adapters switched off.
pub fn reference_logps<B: HoneBackend>(model: &CausalLm<B>, sequences: &[Sequence], pad: u32) -> Tensor<B, 1> {
    crate::lora::linear::without_adapters(|| sequence_logps(model, sequences, pad))
}
