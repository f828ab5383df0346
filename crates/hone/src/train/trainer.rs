//! The trainer: one optimizer step per call (so the browser can await each step and the CLI can
//! loop), AdamW on the LoRA parameters only, gradient accumulation with the loss normalised by
//! the step's counted tokens (as transformers' Trainer), global-norm clipping, 32-bit or
//! bitsandbytes' 8-bit moments, seeded data order
//! and dropout, and a state that checkpoints and resumes exactly. Supervised fine-tuning on
//! samples, or DPO / ORPO on preference pairs (`TrainConfig::dpo`, [`Trainer::new_preference`]):
//! the same step, with the loss a function of each sequence's summed log-probabilities,
//! back-propagated as a weight per sequence (see `super::preference`).

use super::loss::{counted_tokens, shifted_targets, IGNORE_INDEX};
use super::adamw8bit::{adamw8bit_update, Int8Moments, Tables, MIN_8BIT_SIZE};
use super::optim::{adamw_update, clip_global_norm, AdamWConfig, HostMoments, Moments, Optim, OptimState, SavedMoments};
use super::schedule::{LrSchedule, Schedule};
use super::preference::{policy_sums, preference_loss, row_weights, DpoConfig, DpoMetrics, PairLogps};
use crate::data::preference::Sequence;
use crate::data::Sample;
pub use crate::readback::read_f32;
use crate::lora::peft::Adapter;
use crate::lora::LoraConfig;
use crate::model::decoder::{onto, Positions, PositionsOn};
use crate::model::CausalLm;
use crate::ops::HoneBackend;
use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub adamw: AdamWConfig,
    /// f32 moments, or bitsandbytes' 8-bit ones.
    pub optim: Optim,
    /// With 8-bit moments, tensors with fewer values keep f32 ones (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: usize,
    /// Global-norm clipping; `None` disables it.
    pub max_grad_norm: Option<f64>,
    /// Samples per micro-batch (padded on the right to the longest).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Stop after this many optimizer steps (else after `epochs`).
    pub max_steps: Option<usize>,
    pub epochs: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Id used for padding (its labels are ignored).
    pub pad_id: u32,
    /// Recompute each decoder layer's activations during backward instead of keeping them from
    /// the forward pass (activation checkpointing per layer).
    pub checkpointing: bool,
    /// Pack consecutive samples into rows of up to this many tokens (positions restart at each
    /// sample and no token attends across samples); `None` pads one sample per row.
    pub pack_len: Option<usize>,
    /// Fill each micro-batch up to this many (padded) tokens instead of `batch_size` rows.
    pub max_batch_tokens: Option<usize>,
    /// With checkpointing, the loss is computed a few positions at a time so that at most this
    /// many logits exist at once (chunked cross-entropy; 128k vocabularies never materialise
    /// `[tokens, vocab]`).
    pub logits_chunk: usize,
    /// Preference tuning (DPO, or ORPO as its loss type) on pairs instead of supervised
    /// fine-tuning; `None`: SFT.
    pub dpo: Option<DpoConfig>,
}

/// Default [`TrainConfig::logits_chunk`]: 4M values, 16 MB of f32 (at most 3 such pieces are
/// alive at once: logits, their gradient, a transposed copy; 64 MB pieces were the largest
/// term after the weights for Phi-3-mini at 1 × 512).
pub const LOGITS_CHUNK: usize = 1 << 22;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() },
            optim: Optim::AdamW,
            min_8bit_size: MIN_8BIT_SIZE,
            max_grad_norm: Some(1.0),
            batch_size: 4,
            grad_accum: 1,
            max_steps: None,
            epochs: 1,
            seed: 42,
            shuffle: true,
            pad_id: 0,
            checkpointing: true,
            pack_len: None,
            max_batch_tokens: None,
            logits_chunk: LOGITS_CHUNK,
            dpo: None,
        }
    }
}

/// Where training is: everything besides the tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Next index into the epoch's order.
    pub position: usize,
    pub total_steps: usize,
    /// Data-parallel peers sharing each step (a resume needs the same number).
    #[serde(default = "one_peer")]
    pub peers: usize,
}

fn one_peer() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps done, counting this one.
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// Mean loss per counted token over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Tokens processed (padding excluded) and tokens with loss.
    pub tokens: usize,
    pub trained_tokens: usize,
    pub grad_norm: Option<f64>,
    /// With DPO: TRL's reward metrics, averaged over the step's micro-batches (`loss` is DPO's).
    pub preference: Option<DpoMetrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// A step's results still on the device (read them with `into_data` or `into_data_async`).
pub struct PendingStep<B: Backend> {
    pub loss_sum: Tensor<B, 1>,
    pub grad_norm: Option<Tensor<B, 1>>,
    pub report: StepReport,
}

pub struct Trainer<B: AutodiffBackend + HoneBackend>
where
    B::InnerBackend: HoneBackend,
{
    pub model: CausalLm<B>,
    pub lora: LoraConfig,
    pub cfg: TrainConfig,
    pub state: TrainState,
    moments: BTreeMap<String, OptimState<B::InnerBackend>>,
    /// 8-bit AdamW's maps and lookup grids, per device.
    tables: Vec<(B::Device, Tables<B::InnerBackend>)>,
    data: Vec<Sample>,
    /// With DPO: the pairs (chosen, rejected) and their reference log-probabilities.
    pairs: Vec<[Sequence; 2]>,
    reference: Vec<PairLogps>,
    /// Token count of each sample (the longer sequence of a pair), for batching.
    lens: Vec<usize>,
    order: Vec<usize>,
    device: B::Device,
    /// With data parallelism: this peer's rank and the number of peers.
    #[cfg(not(target_arch = "wasm32"))]
    peer: Option<super::data_parallel::DataParallel>,
}

/// Micro-batches of `batch_size` per epoch, and optimizer steps per epoch.
pub fn steps_per_epoch(samples: usize, batch_size: usize, grad_accum: usize) -> usize {
    samples.div_ceil(batch_size.max(1)).div_ceil(grad_accum.max(1))
}

/// The rows of the micro-batch that starts at `order[at]`, each row a list of sample indices
/// (one, unless packing), and where the next micro-batch starts. A micro-batch never crosses
/// the end of the epoch.
pub fn micro_batch(cfg: &TrainConfig, lens: &[usize], order: &[usize], mut at: usize) -> (Vec<Vec<usize>>, usize) {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut longest = 0;
    while at < order.len() {
        let row: Vec<usize> = match cfg.pack_len {
            Some(cap) => {
                let mut row = vec![order[at]];
                let mut used = lens[order[at]];
                while at + row.len() < order.len() && used + lens[order[at + row.len()]] <= cap {
                    used += lens[order[at + row.len()]];
                    row.push(order[at + row.len()]);
                }
                row
            }
            None => vec![order[at]],
        };
        let used: usize = row.iter().map(|&i| lens[i]).sum();
        let len = cfg.pack_len.map_or(used, |cap| cap.max(used));
        let fits = match cfg.max_batch_tokens {
            Some(budget) => (rows.len() + 1) * longest.max(len) <= budget,
            None => rows.len() < cfg.batch_size.max(1),
        };
        if !fits && !rows.is_empty() {
            break;
        }
        longest = longest.max(len);
        at += row.len();
        rows.push(row);
    }
    (rows, at)
}

/// Optimizer steps over `epochs` epochs of `lens`, batched as `cfg` says.
fn total_steps(cfg: &TrainConfig, lens: &[usize]) -> usize {
    let accum = cfg.grad_accum.max(1);
    if cfg.pack_len.is_none() && cfg.max_batch_tokens.is_none() {
        return steps_per_epoch(lens.len(), cfg.batch_size, accum) * cfg.epochs;
    }
    (0..cfg.epochs)
        .map(|e| {
            let order = epoch_order(lens.len(), cfg.seed, e, cfg.shuffle);
            let (mut at, mut n) = (0usize, 0usize);
            while at < order.len() {
                at = micro_batch(cfg, lens, &order, at).1;
                n += 1;
            }
            n.div_ceil(accum)
        })
        .sum()
}

/// One micro-batch on the host: rows of ids and labels padded to one length, and (when packing)
/// the lengths of the samples in each row.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    pub packed: Option<Vec<Vec<usize>>>,
    /// Preference sequences: which tokens are the completion's (`None`: every labelled one).
    pub completion: Option<Vec<Vec<bool>>>,
}

impl Batch {
    /// One sample per row.
    pub fn padded(samples: &[&Sample], pad: u32) -> Batch {
        let (ids, labels) = pad_batch(samples, pad);
        Batch { ids, labels, packed: None, completion: None }
    }

    /// Preference sequences, one per row: labels on the completion, or on every token when
    /// `whole` (ORPO's NLL), the completion marked either way.
    pub fn sequences(sequences: &[&Sequence], whole: bool, pad: u32) -> Batch {
        let samples: Vec<Sample> = sequences
            .iter()
            .map(|s| if whole { Sample { input_ids: s.ids.clone(), labels: s.ids.iter().map(|&i| i as i64).collect() } } else { s.sample() })
            .collect();
        let (ids, labels) = pad_batch(&samples.iter().collect::<Vec<_>>(), pad);
        let t = ids.first().map_or(0, |r| r.len());
        let completion = sequences.iter().map(|s| s.completion.iter().copied().chain(std::iter::repeat(false)).take(t).collect()).collect();
        Batch { ids, labels, packed: None, completion: Some(completion) }
    }

    /// The completion marks aligned with [`shifted_targets`]: whether the token each position
    /// predicts is a completion token.
    pub fn shifted_completion(&self) -> Vec<Vec<bool>> {
        match &self.completion {
            Some(c) => c.iter().map(|row| row.iter().skip(1).copied().chain(std::iter::once(false)).collect()).collect(),
            None => shifted_targets(&self.labels).iter().map(|r| r.iter().map(|&l| l >= 0).collect()).collect(),
        }
    }

    /// Several samples per row. A sample's first label is ignored: the token before it belongs
    /// to another sample (as transformers' DataCollatorWithFlattening does).
    pub fn packed(rows: &[Vec<&Sample>], pad: u32) -> Batch {
        let joined: Vec<Sample> = rows
            .iter()
            .map(|row| Sample {
                input_ids: row.iter().flat_map(|s| s.input_ids.iter().copied()).collect(),
                labels: row.iter().flat_map(|s| s.labels.iter().enumerate().map(|(i, &l)| if i == 0 { IGNORE_INDEX } else { l })).collect(),
            })
            .collect();
        let (ids, labels) = pad_batch(&joined.iter().collect::<Vec<_>>(), pad);
        let packed = Some(rows.iter().map(|row| row.iter().map(|s| s.input_ids.len()).collect()).collect());
        Batch { ids, labels, packed, completion: None }
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map_or(0, |r| r.len())
    }

    fn positions<B: Backend>(&self, config: &crate::model::Config, device: &B::Device) -> Positions<B> {
        match &self.packed {
            Some(rows) => Positions::packed(config, rows, self.seq_len(), device),
            None => Positions::new(config, self.seq_len(), device),
        }
    }
}

fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch as u64 + 1);
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Pads samples on the right: ids with `pad`, labels with IGNORE_INDEX.
pub fn pad_batch(samples: &[&Sample], pad: u32) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let t = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let ids = samples
        .iter()
        .map(|s| s.input_ids.iter().map(|&i| i as i64).chain(std::iter::repeat(pad as i64)).take(t).collect())
        .collect();
    let labels = samples.iter().map(|s| s.labels.iter().copied().chain(std::iter::repeat(IGNORE_INDEX)).take(t).collect()).collect();
    (ids, labels)
}

/// Gradients of the LoRA tensors of `linears` (zeros for one the loss does not reach).
fn lora_grads<'a, B: AutodiffBackend + HoneBackend>(
    linears: impl IntoIterator<Item = (String, &'a crate::lora::LoraLinear<B>)>,
    g: &B::Gradients,
) -> Vec<(String, Tensor<B::InnerBackend, 2>)> {
    let mut out = Vec::new();
    for (name, lin) in linears {
        let Some(l) = &lin.lora else { continue };
        for (which, p) in l.params() {
            let value = p.val();
            out.push((format!("{name}.{which}"), value.grad(g).unwrap_or_else(|| value.inner().zeros_like())));
        }
    }
    out
}

/// Each LoRA tensor's gradient, by `{module}.lora_A` / `.lora_B`.
type LoraGrads<B> = Vec<(String, Tensor<B, 2>)>;

/// A step's micro-batches: each one's rows of sample (or pair) indices and its batch, and the
/// step's counted and processed tokens.
struct Draw {
    rows: Vec<Vec<Vec<usize>>>,
    batches: Vec<Batch>,
    counted: usize,
    tokens: usize,
}

impl Draw {
    /// The pairs of micro-batch `k` (a preference run's rows hold one pair each).
    fn pairs(&self, k: usize) -> Vec<usize> {
        self.rows[k].iter().map(|r| r[0]).collect()
    }
}

/// The step's gradients and losses summed over its micro-batches, and their preference metrics.
struct Accumulated<B: Backend> {
    grads: BTreeMap<String, Tensor<B, 2>>,
    loss_sum: Option<Tensor<B, 1>>,
    preference: Vec<DpoMetrics>,
}

impl<B: Backend> Default for Accumulated<B> {
    fn default() -> Self {
        Accumulated { grads: BTreeMap::new(), loss_sum: None, preference: Vec::new() }
    }
}

impl<B: Backend> Accumulated<B> {
    fn add(&mut self, loss: Tensor<B, 1>, grads: LoraGrads<B>, metrics: Option<DpoMetrics>) {
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(l) => l + loss,
            None => loss,
        });
        for (key, g) in grads {
            let acc = match self.grads.remove(&key) {
                Some(prev) => prev + g,
                None => g,
            };
            self.grads.insert(key, acc);
        }
        self.preference.extend(metrics);
    }
}

/// What a micro-batch's gradient is of: the token loss divided by a norm (SFT), or a function
/// of each row's summed log-probabilities (`[2 × rows]`: over the completion, then over every
/// predicted token), given as the weights it puts on those sums of token losses (DPO, ORPO; see
/// [`super::preference::row_weights`]).
enum Objective<'a> {
    Tokens(f64),
    Sequences(&'a dyn Fn(&[f64]) -> Vec<f32>),
}

/// Values of `−x` (summed losses as log-probabilities), read back (native; in wasm the read
/// would block, so preference runs are native only).
fn read_neg<B: Backend>(x: Tensor<B, 1>) -> Vec<f64> {
    x.into_data().iter::<f32>().map(|v| -f64::from(v)).collect()
}

/// The mean of micro-batches' metrics, `None` for none.
fn mean_metrics(m: &[DpoMetrics]) -> Option<DpoMetrics> {
    let n = m.len() as f64;
    let mean = |f: fn(&DpoMetrics) -> f64| m.iter().map(f).sum::<f64>() / n;
    let mean_of = |f: fn(&DpoMetrics) -> Option<f64>| m.iter().map(f).sum::<Option<f64>>().map(|s| s / n);
    (!m.is_empty()).then(|| DpoMetrics {
        nll_loss: mean_of(|x| x.nll_loss),
        log_odds_ratio: mean_of(|x| x.log_odds_ratio),
        log_odds_chosen: mean_of(|x| x.log_odds_chosen),
        loss: mean(|x| x.loss),
        rewards_chosen: mean(|x| x.rewards_chosen),
        rewards_rejected: mean(|x| x.rewards_rejected),
        rewards_accuracies: mean(|x| x.rewards_accuracies),
        rewards_margins: mean(|x| x.rewards_margins),
        logps_chosen: mean(|x| x.logps_chosen),
        logps_rejected: mean(|x| x.logps_rejected),
    })
}

/// Token ids `[B, T]` as host data: the model takes them so (see [`CausalLm::embed`]).
pub(crate) fn id_rows(rows: &[Vec<i64>]) -> TensorData {
    let (b, t) = (rows.len(), rows.first().map_or(0, |r| r.len()));
    TensorData::new(rows.concat(), [b, t])
}

impl<B: AutodiffBackend + HoneBackend> Trainer<B>
where
    B::InnerBackend: HoneBackend,
{
    /// `model` must already carry its LoRA adapters.
    pub fn new(model: CausalLm<B>, lora: LoraConfig, data: Vec<Sample>, cfg: TrainConfig, device: B::Device) -> Self {
        let lens: Vec<usize> = data.iter().map(|s| s.input_ids.len()).collect();
        let total_steps = cfg.max_steps.unwrap_or_else(|| total_steps(&cfg, &lens));
        let order = epoch_order(data.len(), cfg.seed, 0, cfg.shuffle);
        Trainer {
            model,
            lora,
            cfg,
            state: TrainState { step: 0, epoch: 0, position: 0, total_steps, peers: 1 },
            moments: BTreeMap::new(),
            tables: Vec::new(),
            data,
            pairs: Vec::new(),
            reference: Vec::new(),
            lens,
            order,
            device,
            #[cfg(not(target_arch = "wasm32"))]
            peer: None,
        }
    }

    /// A preference (DPO or ORPO) run on `pairs` (chosen, rejected), with `cfg.dpo` set. DPO's
    /// reference is the model as given: its log-probabilities of every pair are computed once,
    /// here (the base for a new adapter, whose B is zero; base + adapter when starting from a
    /// trained one, as TRL's frozen copy of it), unless `reference` brings them (a resumed run's
    /// checkpoint). ORPO has none. Native: the values are read back.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_preference(model: CausalLm<B>, lora: LoraConfig, pairs: Vec<[Sequence; 2]>, reference: Option<Vec<PairLogps>>, cfg: TrainConfig, device: B::Device) -> crate::Result<Self> {
        let reference = match reference {
            Some(r) => r,
            None if cfg.dpo.is_some_and(|d| d.loss_type.needs_reference()) => {
                let inner = model.valid();
                super::preference::pair_logps(&inner, &pairs, cfg.batch_size, cfg.pad_id)
            }
            None => Vec::new(),
        };
        Self::with_reference(model, lora, pairs, reference, cfg, device)
    }

    /// A preference run whose reference log-probabilities are given (one per pair; none for
    /// ORPO), e.g. computed with [`super::preference::pair_sums_async`] in the page.
    pub fn with_reference(model: CausalLm<B>, lora: LoraConfig, pairs: Vec<[Sequence; 2]>, reference: Vec<PairLogps>, cfg: TrainConfig, device: B::Device) -> crate::Result<Self> {
        assert!(cfg.dpo.is_some() && cfg.pack_len.is_none() && cfg.max_batch_tokens.is_none(), "preference runs set cfg.dpo and pad pairs (no packing)");
        let needs_reference = cfg.dpo.is_some_and(|d| d.loss_type.needs_reference());
        if needs_reference && reference.len() != pairs.len() {
            return Err(crate::Error::format("reference log-probabilities", format!("{} saved for {} pairs: resume on the same data", reference.len(), pairs.len())));
        }
        let mut t = Trainer::new(model, lora, Vec::new(), cfg, device);
        t.reference = if needs_reference { reference } else { Vec::new() };
        t.lens = pairs.iter().map(|[c, r]| c.ids.len().max(r.ids.len())).collect();
        t.state.total_steps = t.cfg.max_steps.unwrap_or_else(|| total_steps(&t.cfg, &t.lens));
        t.order = epoch_order(pairs.len(), t.cfg.seed, 0, t.cfg.shuffle);
        t.pairs = pairs;
        Ok(t)
    }

    /// The reference log-probabilities of a preference run's pairs.
    pub fn reference_logps(&self) -> &[PairLogps] {
        &self.reference
    }

    /// Training examples (pairs, with DPO).
    pub fn data_len(&self) -> usize {
        self.lens.len()
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { kind: self.cfg.schedule, lr: self.cfg.lr, warmup_steps: self.cfg.warmup_steps, total_steps: self.state.total_steps }
    }

    /// The next micro-batch's rows of sample indices, moving to the next epoch (and its order)
    /// at the end of one.
    fn next_rows(&mut self) -> Vec<Vec<usize>> {
        if self.state.position >= self.order.len() {
            self.state.epoch += 1;
            self.state.position = 0;
            self.order = epoch_order(self.lens.len(), self.cfg.seed, self.state.epoch, self.cfg.shuffle);
        }
        let (rows, next) = micro_batch(&self.cfg, &self.lens, &self.order, self.state.position);
        self.state.position = next;
        rows
    }

    fn batch(&self, rows: &[Vec<usize>]) -> Batch {
        if let Some(dpo) = self.cfg.dpo {
            // TRL's layout: every chosen sequence, then every rejected one.
            let sequences: Vec<&Sequence> = (0..2).flat_map(|side| rows.iter().map(move |r| &self.pairs[r[0]][side])).collect();
            return Batch::sequences(&sequences, dpo.loss_type.whole_sequences(), self.cfg.pad_id);
        }
        let samples: Vec<Vec<&Sample>> = rows.iter().map(|r| r.iter().map(|&i| &self.data[i]).collect()).collect();
        match self.cfg.pack_len {
            Some(_) => Batch::packed(&samples, self.cfg.pad_id),
            None => Batch::padded(&samples.iter().map(|r| r[0]).collect::<Vec<_>>(), self.cfg.pad_id),
        }
    }

    /// Peers sharing each step (1 without data parallelism).
    fn peers(&self) -> usize {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(p) = &self.peer {
            return p.peers;
        }
        1
    }

    /// Whether micro-batch `k` of a step is this peer's.
    fn mine(&self, k: usize) -> bool {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(p) = &self.peer {
            return k % p.peers == p.rank;
        }
        let _ = k;
        true
    }

    /// Makes this trainer peer `dp.rank` of `dp.peers` (see [`super::data_parallel`]): each step
    /// then draws `peers` times the micro-batches, computes its share and sums the gradients
    /// with the others'. Joins the peers (blocks until all have joined). SFT only.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn data_parallel(mut self, mut dp: super::data_parallel::DataParallel) -> crate::Result<Self> {
        if self.cfg.dpo.is_some() {
            return Err(crate::Error::Unsupported { file: "--data-parallel".into(), message: "data parallelism is for SFT runs; DPO and ORPO run on one peer".into() });
        }
        // Peers may share one model's frozen weights (clones); their LoRA tensors are re-made
        // here as this peer's own, since burn's autodiff merges the graphs of threads that
        // share a tracked tensor (and the merges lock each other).
        for (_, lin) in self.model.linears_mut() {
            let Some(l) = &mut lin.lora else { continue };
            for (_, param) in l.params_mut() {
                let own = Tensor::from_inner(param.val().inner()).require_grad();
                *param = Param::initialized(param.id, own);
            }
        }
        let start = super::data_parallel::Start { step: self.state.step, fingerprint: self.fingerprint() };
        dp.join::<B::InnerBackend>(&self.device, start)?;
        if self.cfg.max_steps.is_none() {
            let mut cfg = self.cfg.clone();
            cfg.grad_accum = cfg.grad_accum.max(1) * dp.peers;
            self.state.total_steps = total_steps(&cfg, &self.lens);
        }
        self.state.peers = dp.peers;
        self.peer = Some(dp);
        Ok(self)
    }

    /// A hash of what must be equal on every peer: the settings and the data (FNV-1a).
    #[cfg(not(target_arch = "wasm32"))]
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(serde_json::to_string(&self.cfg).unwrap_or_default().as_bytes());
        eat(format!("{:?}", self.lora).as_bytes());
        for s in &self.data {
            s.input_ids.iter().for_each(|t| eat(&t.to_le_bytes()));
            s.labels.iter().for_each(|t| eat(&t.to_le_bytes()));
        }
        h
    }

    /// Leaves the peers after the last step.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn leave_peers(&self) -> crate::Result<()> {
        match &self.peer {
            Some(dp) => dp.leave::<B::InnerBackend>(),
            None => Ok(()),
        }
    }

    /// The next step's micro-batches, drawn from the data order.
    fn draw(&mut self) -> Draw {
        let rows: Vec<Vec<Vec<usize>>> = (0..self.cfg.grad_accum.max(1) * self.peers()).map(|_| self.next_rows()).collect();
        let batches: Vec<Batch> = rows.iter().map(|r| self.batch(r)).collect();
        let counted: usize = batches.iter().map(|b| counted_tokens(&b.labels)).sum();
        let tokens: usize = match self.cfg.dpo {
            Some(_) => rows.iter().flatten().flatten().map(|&i| self.pairs[i].iter().map(|s| s.ids.len()).sum::<usize>()).sum(),
            None => rows.iter().flatten().flatten().map(|&i| self.lens[i]).sum(),
        };
        Draw { rows, batches, counted, tokens }
    }

    /// Micro-batch `k`'s dropout seed: it depends only on (seed, step, micro-batch), so a resumed
    /// run draws the same masks.
    fn micro_seed(&self, k: usize) -> u64 {
        self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(self.state.step as u64).wrapping_add((k as u64) << 40)
    }

    /// One optimizer step; its loss stays on the device (see [`Trainer::step`] for a read).
    /// Panics where [`Self::try_step_pending`] fails (only with data parallelism: a lost peer).
    pub fn step_pending(&mut self) -> PendingStep<B::InnerBackend> {
        self.try_step_pending().unwrap_or_else(|e| panic!("{e}"))
    }

    /// One optimizer step; fails only with data parallelism, when the peers cannot sum.
    pub fn try_step_pending(&mut self) -> crate::Result<PendingStep<B::InnerBackend>> {
        let draw = self.draw();
        let norm = draw.counted.max(1) as f64;
        let mut acc = Accumulated::default();
        for (k, batch) in draw.batches.iter().enumerate() {
            if !self.mine(k) {
                continue;
            }
            let seed = self.micro_seed(k);
            match self.cfg.dpo {
                Some(dpo) => {
                    let (loss, g, metrics) = self.preference_gradients(batch, &draw.pairs(k), dpo, seed);
                    acc.add(loss, g, Some(metrics));
                }
                None => {
                    let (loss, g) = self.gradients(batch, norm, seed);
                    acc.add(loss, g, None);
                }
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(dp) = &self.peer {
            acc = Self::summed_over_peers(dp, acc)?;
        }
        Ok(self.apply(draw, acc))
    }

    /// The step's gradients and loss summed over the peers (every peer gets the same sums).
    #[cfg(not(target_arch = "wasm32"))]
    fn summed_over_peers(dp: &super::data_parallel::DataParallel, acc: Accumulated<B::InnerBackend>) -> crate::Result<Accumulated<B::InnerBackend>> {
        let Accumulated { grads, loss_sum, preference } = acc;
        let keys: Vec<String> = grads.keys().cloned().collect();
        let mut tensors: Vec<Tensor<B::InnerBackend, 2>> = grads.into_values().collect();
        tensors.push(loss_sum.expect("a peer computes at least one micro-batch").reshape([1, 1]));
        // A lost peer cannot be recovered from inside a step: the run stops, naming the cause.
        let mut summed = dp.sum(tensors)?;
        let loss = summed.pop().expect("the loss").reshape([1]);
        Ok(Accumulated { grads: keys.into_iter().zip(summed).collect(), loss_sum: Some(loss), preference })
    }

    /// [`Self::step_pending`] reading each preference micro-batch's log-probabilities back
    /// without blocking (the page: a synchronous read panics in wasm), between an untracked
    /// forward pass that saves each layer's input and the backward from them. Needs activation
    /// checkpointing for preference runs; SFT steps are [`Self::step_pending`]'s.
    pub async fn step_pending_async(&mut self) -> crate::Result<PendingStep<B::InnerBackend>> {
        let Some(dpo) = self.cfg.dpo else { return self.try_step_pending() };
        if !self.cfg.checkpointing {
            return Err(crate::Error::format("checkpointing", "a preference step that reads back without blocking runs with activation checkpointing on"));
        }
        let draw = self.draw();
        let mut acc = Accumulated::default();
        for (k, batch) in draw.batches.iter().enumerate() {
            let seed = self.micro_seed(k);
            let inputs = self.forward_saving_inputs(batch, seed);
            let sums = self.head_sums(batch, inputs.last().expect("embeddings"));
            let logps: Vec<f64> = read_f32(sums).await?.into_iter().map(|v| -f64::from(v)).collect();
            let (weights, metrics) = self.preference_weights(batch, &draw.pairs(k), dpo, &logps);
            let (_, g) = self.backward_from_inputs(batch, inputs, 1.0, Some(&weights), seed);
            let loss = Tensor::from_data(TensorData::new(vec![(metrics.loss / self.cfg.grad_accum.max(1) as f64) as f32], [1]), &self.model.head_device());
            acc.add(loss, g, Some(metrics));
        }
        Ok(self.apply(draw, acc))
    }

    /// Clips the step's summed gradients, updates every LoRA tensor with AdamW and moves the
    /// state on.
    fn apply(&mut self, draw: Draw, acc: Accumulated<B::InnerBackend>) -> PendingStep<B::InnerBackend> {
        let step = self.state.step;
        let Accumulated { grads, loss_sum, preference } = acc;
        let keys: Vec<String> = grads.keys().cloned().collect();
        let mut list: Vec<Tensor<B::InnerBackend, 2>> = keys.iter().map(|k| grads[k].clone()).collect();
        let grad_norm = self.cfg.max_grad_norm.map(|max| clip_global_norm(&mut list, max));
        let clipped: BTreeMap<String, Tensor<B::InnerBackend, 2>> = keys.into_iter().zip(list).collect();
        let lr = self.schedule().lr_at(step);
        let adamw = self.cfg.adamw;
        let (optim, min_8bit) = (self.cfg.optim, self.cfg.min_8bit_size);
        for (name, lin) in self.model.linears_mut() {
            let Some(l) = &mut lin.lora else { continue };
            for (which, param) in l.params_mut() {
                let key = format!("{name}.{which}");
                let value = param.val().inner();
                let device = value.device();
                let m = self.moments.entry(key.clone()).or_insert_with(|| {
                    let [r, c] = value.dims();
                    match optim {
                        Optim::AdamW8bit if r * c >= min_8bit => OptimState::Int8(Int8Moments::zeros([r, c], &device)),
                        _ => OptimState::F32(Moments::zeros([r, c], &device)),
                    }
                });
                let updated = match m {
                    OptimState::F32(m) => adamw_update(value, clipped[&key].clone(), m, &adamw, lr, step + 1),
                    OptimState::Int8(m) => {
                        let at = match self.tables.iter().position(|(d, _)| *d == device) {
                            Some(at) => at,
                            None => {
                                self.tables.push((device.clone(), Tables::new(&device)));
                                self.tables.len() - 1
                            }
                        };
                        adamw8bit_update(value, clipped[&key].clone(), m, &self.tables[at].1, &adamw, lr, step + 1)
                    }
                };
                *param = Param::initialized(param.id, Tensor::from_inner(updated).require_grad());
            }
        }
        self.state.step += 1;
        PendingStep {
            loss_sum: loss_sum.expect("at least one micro-batch"),
            grad_norm,
            report: StepReport {
                step: self.state.step,
                total_steps: self.state.total_steps,
                epoch: self.state.epoch,
                loss: f64::NAN,
                lr,
                tokens: draw.tokens,
                trained_tokens: draw.counted,
                grad_norm: None,
                preference: mean_metrics(&preference),
            },
        }
    }

    /// The summed loss of one micro-batch divided by `norm`, and the gradient of every LoRA
    /// tensor (`{module}.lora_A` / `.lora_B`), with or without activation checkpointing as the
    /// config says. `seed` fixes the dropout masks.
    pub fn gradients(&self, batch: &Batch, norm: f64, seed: u64) -> (Tensor<B::InnerBackend, 1>, Vec<(String, Tensor<B::InnerBackend, 2>)>) {
        self.gradients_of(batch, Objective::Tokens(norm), seed)
    }

    /// A preference micro-batch of `pairs` (laid out by [`Self::batch`]): its loss (divided by
    /// the accumulation steps), the LoRA gradients, and TRL's metrics. The policy's
    /// log-probabilities come from the forward pass whose graph the backward then uses, so the
    /// weights each sequence gets are exactly the loss's derivatives.
    fn preference_gradients(&self, batch: &Batch, pairs: &[usize], dpo: DpoConfig, seed: u64) -> (Tensor<B::InnerBackend, 1>, LoraGrads<B::InnerBackend>, DpoMetrics) {
        let metrics = std::cell::Cell::new(None);
        let weigh = |logps: &[f64]| {
            let (weights, m) = self.preference_weights(batch, pairs, dpo, logps);
            metrics.set(Some(m));
            weights
        };
        let (_, grads) = self.gradients_of(batch, Objective::Sequences(&weigh), seed);
        let metrics = metrics.get().expect("the objective was evaluated");
        let loss = Tensor::from_data(TensorData::new(vec![(metrics.loss / self.cfg.grad_accum.max(1) as f64) as f32], [1]), &self.model.head_device());
        (loss, grads, metrics)
    }

    /// The weights a preference micro-batch's loss puts on its rows' sums (see
    /// [`super::preference::row_weights`]), from the policy's `[2 × rows]` log-probability sums,
    /// and TRL's metrics.
    fn preference_weights(&self, batch: &Batch, pairs: &[usize], dpo: DpoConfig, logps: &[f64]) -> (Vec<f32>, DpoMetrics) {
        let reference: Vec<PairLogps> = pairs.iter().filter_map(|&i| self.reference.get(i).copied()).collect();
        let lens: Vec<(usize, usize)> = pairs.iter().map(|&i| (self.pairs[i][0].completion_len(), self.pairs[i][1].completion_len())).collect();
        let chosen_tokens = counted_tokens(&batch.labels[..pairs.len()]);
        let loss = preference_loss(dpo, &policy_sums(logps, chosen_tokens), &reference, &lens);
        (row_weights(&loss, self.cfg.grad_accum.max(1) as f64), loss.metrics)
    }

    fn gradients_of(&self, batch: &Batch, objective: Objective<'_>, seed: u64) -> (Tensor<B::InnerBackend, 1>, LoraGrads<B::InnerBackend>) {
        if self.cfg.checkpointing {
            return self.gradients_checkpointed(batch, objective, seed);
        }
        for (k, device) in self.model.devices().iter().enumerate() {
            B::seed(device, seed.wrapping_add(k as u64));
        }
        let pos = batch.positions::<B>(&self.model.config, &self.device);
        let hidden = self.model.hidden_at(&id_rows(&batch.ids), &pos);
        let targets = shifted_targets(&batch.labels);
        let loss = match objective {
            Objective::Tokens(norm) => counted_nll(&self.model, hidden, &targets).div_scalar(norm),
            Objective::Sequences(weigh) => {
                let rows = counted_nll_parts(&self.model, hidden, &targets, &batch.shifted_completion());
                let weights = weigh(&read_neg(rows.clone().inner()));
                let n = weights.len();
                (rows.clone() * Tensor::<B, 1>::from_data(TensorData::new(weights, [n]), &rows.device())).sum()
            }
        };
        let g = loss.backward();
        (loss.inner(), lora_grads(self.model.linears(), &g))
    }

    /// As [`Self::gradients`], keeping only each decoder layer's input from the forward pass: a
    /// first pass runs without tracking and saves the layer inputs; then, from the top, each
    /// layer is run again with tracking from its saved input and back-propagated alone, its
    /// output's gradient coming from the layer above. Peak memory holds one layer's activations
    /// rather than all of them, for one more forward pass.
    fn gradients_checkpointed(&self, batch: &Batch, objective: Objective<'_>, seed: u64) -> (Tensor<B::InnerBackend, 1>, LoraGrads<B::InnerBackend>) {
        let inputs = self.forward_saving_inputs(batch, seed);
        match objective {
            Objective::Tokens(norm) => self.backward_from_inputs(batch, inputs, norm, None, seed),
            // A loss of whole sequences: their log-probabilities from the untracked pass's output
            // (the tracked recomputation gives the same values), then a weight per row.
            Objective::Sequences(weigh) => {
                let weights = weigh(&read_neg(self.head_sums(batch, inputs.last().expect("embeddings"))));
                self.backward_from_inputs(batch, inputs, 1.0, Some(&weights), seed)
            }
        }
    }

    /// Dropout seed of layer `i` in a checkpointed pass (the recomputation draws the same masks).
    fn layer_seed(seed: u64, i: usize) -> u64 {
        seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }

    /// The untracked forward pass of a checkpointed step: the embeddings and every decoder
    /// layer's output (the last is the top layer's).
    fn forward_saving_inputs(&self, batch: &Batch, seed: u64) -> Vec<Tensor<B::InnerBackend, 3>> {
        let inner_device = self.model.model.embed_tokens.device();
        let pos = batch.positions::<B::InnerBackend>(&self.model.config, &inner_device);
        let untracked = self.model.valid();
        let mut inputs: Vec<Tensor<B::InnerBackend, 3>> = vec![untracked.embed(&id_rows(&batch.ids))];
        crate::lora::linear::with_training_dropout(|| {
            let mut pos = PositionsOn::new(&pos);
            for (i, layer) in untracked.model.layers.iter().enumerate() {
                let device = layer.device();
                B::seed(&device, Self::layer_seed(seed, i));
                let x = layer.forward(onto(inputs[i].clone(), &device), pos.on(&device));
                inputs.push(x);
            }
        });
        inputs
    }

    /// Each row's summed completion and whole-sequence losses (`[2 × rows]`, on the device) from
    /// the top layer's output.
    fn head_sums(&self, batch: &Batch, top: &Tensor<B::InnerBackend, 3>) -> Tensor<B::InnerBackend, 1> {
        let head = self.model.valid();
        nll_parts_chunked(&head, head.final_norm(top.clone()), &shifted_targets(&batch.labels), &batch.shifted_completion(), self.cfg.logits_chunk)
    }

    /// The backward of a checkpointed step from the saved layer inputs: the token loss divided
    /// by `norm`, or with `weights` the rows' weighted sums (see [`counted_nll_weighted`]).
    fn backward_from_inputs(&self, batch: &Batch, mut inputs: Vec<Tensor<B::InnerBackend, 3>>, norm: f64, weights: Option<&[f32]>, seed: u64) -> (Tensor<B::InnerBackend, 1>, LoraGrads<B::InnerBackend>) {
        let inner_device = self.model.model.embed_tokens.device();
        let pos = batch.positions::<B::InnerBackend>(&self.model.config, &inner_device);
        let completion = batch.shifted_completion();
        let named = self.model.linears();
        let in_layer = |i: Option<usize>| {
            let prefix = i.map(|i| format!("model.layers.{i}."));
            named.iter().filter(move |(n, _)| match &prefix {
                Some(p) => n.starts_with(p.as_str()),
                None => !n.starts_with("model.layers."),
            })
        };
        let mut out = Vec::new();

        // The head, a few positions at a time: final norm, logits and loss from the last
        // layer's output (chunked cross-entropy), each piece back-propagated alone.
        let top = inputs.pop().expect("embeddings");
        let [rows, t, _] = top.dims();
        let vocab = self.model.config.vocab_size;
        let step = (self.cfg.logits_chunk / (rows * vocab).max(1)).clamp(1, t.max(1));
        let targets = shifted_targets(&batch.labels);
        let mut nll: Option<Tensor<B::InnerBackend, 1>> = None;
        let mut grad_pieces = Vec::new();
        let mut head_grads: BTreeMap<String, Tensor<B::InnerBackend, 2>> = BTreeMap::new();
        for start in (0..t).step_by(step) {
            let len = step.min(t - start);
            let x = Tensor::<B, 3>::from_inner(top.clone().narrow(1, start, len)).require_grad();
            let piece = columns(&targets, start, len);
            let loss = match weights {
                None => counted_nll(&self.model, self.model.final_norm(x.clone()), &piece).div_scalar(norm),
                Some(w) => counted_nll_weighted(&self.model, self.model.final_norm(x.clone()), &piece, &columns(&completion, start, len), w),
            };
            let g = loss.backward();
            for (k, gp) in lora_grads(in_layer(None).map(|(n, l)| (n.clone(), *l)), &g) {
                let acc = match head_grads.remove(&k) {
                    Some(prev) => prev + gp,
                    None => gp,
                };
                head_grads.insert(k, acc);
            }
            grad_pieces.push(x.grad(&g).expect("the loss depends on the hidden states"));
            nll = Some(match nll {
                Some(n) => n + loss.inner(),
                None => loss.inner(),
            });
        }
        drop(top);
        out.extend(head_grads);
        let mut grad_out = Tensor::cat(grad_pieces, 1);
        let nll = nll.expect("at least one position");

        let pos = pos.to_backend(Tensor::<B, 4>::from_inner);
        let mut pos = PositionsOn::new(&pos);
        for i in (0..self.model.model.layers.len()).rev() {
            let layer = &self.model.model.layers[i];
            let device = layer.device();
            let x = Tensor::<B, 3>::from_inner(onto(inputs.pop().expect("a saved input per layer"), &device)).require_grad();
            B::seed(&device, Self::layer_seed(seed, i));
            let y = layer.forward(x.clone(), pos.on(&device));
            // d(sum(y·g))/dy = g: back-propagates the upper layers' gradient through this layer.
            let g = (y * Tensor::from_inner(onto(grad_out, &device))).sum().backward();
            out.extend(lora_grads(in_layer(Some(i)).map(|(n, l)| (n.clone(), *l)), &g));
            grad_out = match x.grad(&g) {
                Some(gx) => gx,
                None => break,
            };
        }
        (nll, out)
    }

    /// One optimizer step, its loss read back (native: a synchronous read).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self) -> StepReport {
        self.try_step().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::step`], failing where [`Self::try_step_pending`] does.
    pub fn try_step(&mut self) -> crate::Result<StepReport> {
        let pending = self.try_step_pending()?;
        let mut report = pending.report;
        report.loss = pending.loss_sum.into_data().to_vec::<f32>().expect("f32")[0] as f64;
        report.grad_norm = pending.grad_norm.map(|g| g.into_data().to_vec::<f32>().expect("f32")[0] as f64);
        Ok(report)
    }

    /// Loss and perplexity over `samples`, without gradients.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn evaluate(&self, samples: &[Sample]) -> EvalReport {
        let model = self.model.valid();
        let device = model.model.embed_tokens.device();
        evaluate(&model, samples, self.cfg.batch_size, self.cfg.pad_id, &device)
    }

    /// The adapter's tensors, for PEFT's files (native: synchronous reads).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn adapter(&self, base_model_name_or_path: &str) -> Adapter {
        crate::lora::peft::to_host(self.model.linears(), &self.lora, base_model_name_or_path)
    }

    /// Everything a checkpoint holds besides the adapter: the moments, by parameter name.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn optimizer_state(&self) -> Vec<SavedMoments> {
        let f32s = |t: &Tensor<B::InnerBackend, 1>| t.clone().into_data().to_vec::<f32>().expect("f32");
        let words = |t: &Tensor<B::InnerBackend, 1, Int>| t.clone().into_data().convert::<i32>().to_vec::<i32>().expect("i32");
        self.moments
            .iter()
            .map(|(k, state)| match state {
                OptimState::F32(m) => SavedMoments {
                    name: k.clone(),
                    shape: m.exp_avg.dims(),
                    moments: HostMoments::F32 { exp_avg: f32s(&m.exp_avg.clone().flatten(0, 1)), exp_avg_sq: f32s(&m.exp_avg_sq.clone().flatten(0, 1)) },
                },
                OptimState::Int8(m) => SavedMoments {
                    name: k.clone(),
                    shape: m.shape,
                    moments: HostMoments::Int8(m.host_from_words(&words(&m.state1), f32s(&m.absmax1), &words(&m.state2), f32s(&m.absmax2))),
                },
            })
            .collect()
    }

    /// The adapter's tensors read back asynchronously (the browser cannot read synchronously).
    pub async fn adapter_async(&self, base_model_name_or_path: &str) -> crate::Result<Adapter> {
        crate::lora::peft::to_host_async(self.model.linears(), &self.lora, base_model_name_or_path).await
    }

    /// [`Trainer::optimizer_state`], read back asynchronously.
    pub async fn optimizer_state_async(&self) -> crate::Result<Vec<SavedMoments>> {
        let mut out = Vec::with_capacity(self.moments.len());
        for (k, state) in &self.moments {
            out.push(match state {
                OptimState::F32(m) => SavedMoments {
                    name: k.clone(),
                    shape: m.exp_avg.dims(),
                    moments: HostMoments::F32 { exp_avg: read_f32(m.exp_avg.clone()).await?, exp_avg_sq: read_f32(m.exp_avg_sq.clone()).await? },
                },
                OptimState::Int8(m) => {
                    let (s1, s2) = (crate::readback::read_i32(m.state1.clone()).await?, crate::readback::read_i32(m.state2.clone()).await?);
                    let host = m.host_from_words(&s1, read_f32(m.absmax1.clone()).await?, &s2, read_f32(m.absmax2.clone()).await?);
                    SavedMoments { name: k.clone(), shape: m.shape, moments: HostMoments::Int8(host) }
                }
            });
        }
        Ok(out)
    }

    /// The model without autodiff, for [`evaluate_pending`] and generation.
    pub fn eval_model(&self) -> CausalLm<B::InnerBackend> {
        self.model.valid()
    }

    /// Restores a checkpoint: adapter tensors, optimizer moments and the data position.
    pub fn restore(&mut self, adapter: &Adapter, moments: Vec<SavedMoments>, state: TrainState) -> crate::Result<()> {
        adapter.attach(self.model.linears_mut())?;
        // Each parameter's moments go where the parameter lives (layers may be spread over devices).
        let mut devices: BTreeMap<String, B::Device> = BTreeMap::new();
        for (name, lin) in self.model.linears() {
            if let Some(l) = &lin.lora {
                for (which, p) in l.params() {
                    devices.insert(format!("{name}.{which}"), p.val().device().into());
                }
            }
        }
        let inner = self.model.model.embed_tokens.device();
        self.moments = moments
            .into_iter()
            .map(|s| {
                let device = devices.get(&s.name).cloned().unwrap_or_else(|| inner.clone());
                let state = match s.moments {
                    HostMoments::F32 { exp_avg, exp_avg_sq } => OptimState::F32(Moments {
                        exp_avg: Tensor::from_data(TensorData::new(exp_avg, s.shape), &device),
                        exp_avg_sq: Tensor::from_data(TensorData::new(exp_avg_sq, s.shape), &device),
                    }),
                    HostMoments::Int8(h) => OptimState::Int8(Int8Moments::from_host(s.shape, &h, &device)),
                };
                (s.name, state)
            })
            .collect();
        self.order = epoch_order(self.lens.len(), self.cfg.seed, state.epoch, self.cfg.shuffle);
        self.state = state;
        Ok(())
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }
}

/// The summed loss over `samples`, left on the device (one read at the end, not one per batch),
/// and the number of tokens it counts. Logits are made a few positions at a time.
pub fn evaluate_pending<B: HoneBackend>(model: &CausalLm<B>, samples: &[Sample], batch_size: usize, pad: u32, device: &B::Device) -> (Tensor<B, 1>, usize) {
    let mut sum: Option<Tensor<B, 1>> = None;
    let mut count = 0usize;
    for chunk in samples.chunks(batch_size.max(1)) {
        let (ids, labels) = pad_batch(&chunk.iter().collect::<Vec<_>>(), pad);
        count += counted_tokens(&labels);
        let nll = nll_sum_chunked(model, model.hidden(&id_rows(&ids)), &labels, LOGITS_CHUNK, device);
        sum = Some(match sum {
            Some(s) => s + nll,
            None => nll,
        });
    }
    (sum.unwrap_or_else(|| Tensor::zeros([1], device)), count)
}

/// The summed loss from final hidden states `[B, T, hidden]`, at most `chunk` logits at a time.
fn nll_sum_chunked<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, labels: &[Vec<i64>], chunk: usize, device: &B::Device) -> Tensor<B, 1> {
    let targets = shifted_targets(labels);
    sum_over_chunks(model, hidden, chunk, |m, h, start, len| counted_nll(m, h, &columns(&targets, start, len))).unwrap_or_else(|| Tensor::zeros([1], device))
}

/// Positions `start..start + len` of each row.
fn columns<T: Clone>(rows: &[Vec<T>], start: usize, len: usize) -> Vec<Vec<T>> {
    rows.iter().map(|r| r[start..start + len].to_vec()).collect()
}

/// `loss` of each piece of a few positions (at most `chunk` logits; the piece's hidden states,
/// its first position and its length), added up; `None` for no positions.
fn sum_over_chunks<B: HoneBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    chunk: usize,
    loss: impl Fn(&CausalLm<B>, Tensor<B, 3>, usize, usize) -> Tensor<B, 1>,
) -> Option<Tensor<B, 1>> {
    let [rows, t, _] = hidden.dims();
    let step = (chunk / (rows * model.config.vocab_size).max(1)).clamp(1, t.max(1));
    let mut sum: Option<Tensor<B, 1>> = None;
    for start in (0..t).step_by(step) {
        let len = step.min(t - start);
        let l = loss(model, hidden.clone().narrow(1, start, len), start, len);
        sum = Some(match sum {
            Some(s) => s + l,
            None => l,
        });
    }
    sum
}

/// The summed loss of final hidden states `[B, T, hidden]` (after the final norm) against
/// `targets` `[B][T]` (already shifted; negative where nothing is predicted). Only the counted
/// positions go through the head: padding and ignored labels cost no logits (transformers
/// computes them all; with the bench's batches that is a third of the head's work).
fn counted_nll<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, targets: &[Vec<i64>]) -> Tensor<B, 1> {
    match counted_token_nll(model, hidden.clone(), targets) {
        Some((nll, _)) => nll.sum(),
        // Nothing counted: a zero that still depends on the hidden states (the backward runs).
        None => hidden.sum().mul_scalar(0.0),
    }
}

/// The loss of each counted position (row-major), `[counted]`, and each one's (row, position);
/// `None` when nothing is counted.
fn counted_token_nll<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, targets: &[Vec<i64>]) -> Option<(Tensor<B, 1>, Vec<(usize, usize)>)> {
    let [b, t, h] = hidden.dims();
    let flat: Vec<i64> = targets.iter().flatten().copied().collect();
    let rows: Vec<i64> = (0..flat.len()).filter(|&i| flat[i] >= 0).map(|i| i as i64).collect();
    let device = hidden.device();
    if rows.is_empty() {
        return None;
    }
    let picked: Vec<i64> = rows.iter().map(|&i| flat[i as usize]).collect();
    let x = if rows.len() == b * t {
        hidden.reshape([b * t, h])
    } else {
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.clone(), [rows.len()]), &device);
        hidden.reshape([b * t, h]).select(0, index)
    };
    let logits = model.head(x.reshape([1, rows.len(), h]));
    let vocab = logits.dims()[2];
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(picked, [rows.len()]), &logits.device());
    let (nll, _lse) = B::cross_entropy(logits.reshape([rows.len(), vocab]), labels);
    Some((nll, rows.iter().map(|&i| (i as usize / t.max(1), i as usize % t.max(1))).collect()))
}

/// Each row's summed loss over its completion positions, then over all its counted positions,
/// `[2 × B]` (a sequence's negative log-probabilities); `completion[row][position]` marks the
/// completion's (aligned with `targets`).
pub(crate) fn counted_nll_parts<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, targets: &[Vec<i64>], completion: &[Vec<bool>]) -> Tensor<B, 1> {
    let b = hidden.dims()[0];
    match counted_token_nll(model, hidden.clone(), targets) {
        Some((nll, at)) => {
            // Summed by row as a product with one-hot rows: completion sums, then whole sums.
            let n = at.len();
            let mut onehot = vec![0f32; 2 * b * n];
            for (j, &(r, p)) in at.iter().enumerate() {
                onehot[r * n + j] = if completion[r][p] { 1.0 } else { 0.0 };
                onehot[(b + r) * n + j] = 1.0;
            }
            let onehot = Tensor::<B, 2>::from_data(TensorData::new(onehot, [2 * b, n]), &nll.device());
            onehot.matmul(nll.reshape([n, 1])).reshape([2 * b])
        }
        None => Tensor::<B, 1>::zeros([2 * b], &hidden.device()) + hidden.sum().mul_scalar(0.0),
    }
}

/// `Σ_rows weight[row] · row's summed completion loss + weight[B + row] · row's summed loss`,
/// `[1]`: a loss that is a function of those sums (DPO, ORPO) back-propagates as this, with each
/// sum's derivative for weight.
fn counted_nll_weighted<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, targets: &[Vec<i64>], completion: &[Vec<bool>], row_weights: &[f32]) -> Tensor<B, 1> {
    let b = hidden.dims()[0];
    match counted_token_nll(model, hidden.clone(), targets) {
        Some((nll, at)) => {
            let w: Vec<f32> = at.iter().map(|&(r, p)| row_weights[b + r] + if completion[r][p] { row_weights[r] } else { 0.0 }).collect();
            let n = w.len();
            (nll.clone() * Tensor::<B, 1>::from_data(TensorData::new(w, [n]), &nll.device())).sum()
        }
        None => hidden.sum().mul_scalar(0.0),
    }
}

/// [`counted_nll_parts`] over final hidden states `[B, T, hidden]`, at most `chunk` logits at a
/// time.
pub(crate) fn nll_parts_chunked<B: HoneBackend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, targets: &[Vec<i64>], completion: &[Vec<bool>], chunk: usize) -> Tensor<B, 1> {
    let (rows, device) = (hidden.dims()[0], hidden.device());
    sum_over_chunks(model, hidden, chunk, |m, h, start, len| counted_nll_parts(m, h, &columns(targets, start, len), &columns(completion, start, len)))
        .unwrap_or_else(|| Tensor::zeros([2 * rows], &device))
}

/// Loss and perplexity from a summed loss and its token count.
pub fn eval_report(sum: f64, count: usize) -> EvalReport {
    let loss = sum / count.max(1) as f64;
    EvalReport { loss, perplexity: loss.exp(), tokens: count }
}

/// Loss and perplexity of `model` over `samples` (no gradients).
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate<B: HoneBackend>(model: &CausalLm<B>, samples: &[Sample], batch_size: usize, pad: u32, device: &B::Device) -> EvalReport {
    let (sum, count) = evaluate_pending(model, samples, batch_size, pad, device);
    eval_report(sum.into_data().to_vec::<f32>().expect("f32")[0] as f64, count)
}
