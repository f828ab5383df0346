//! The trainer: one optimizer step per call (so the browser can await each step and the CLI can
//! loop), AdamW on the LoRA parameters only, gradient accumulation with the loss normalised by
//! the step's counted tokens (as transformers' Trainer), global-norm clipping, seeded data order
//! and dropout, and a state that checkpoints and resumes exactly.

use super::loss::{causal_lm_nll_sum, counted_tokens, IGNORE_INDEX};
use super::optim::{adamw_update, clip_global_norm, AdamWConfig, Moments};
use super::schedule::{LrSchedule, Schedule};
use crate::data::Sample;
pub use crate::readback::read_f32;
use crate::lora::peft::Adapter;
use crate::lora::LoraConfig;
use crate::model::CausalLm;
use crate::quant::HoneBackend;
use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub adamw: AdamWConfig,
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
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() },
            max_grad_norm: Some(1.0),
            batch_size: 4,
            grad_accum: 1,
            max_steps: None,
            epochs: 1,
            seed: 42,
            shuffle: true,
            pad_id: 0,
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
    moments: BTreeMap<String, Moments<B::InnerBackend>>,
    data: Vec<Sample>,
    order: Vec<usize>,
    device: B::Device,
}

/// Micro-batches of `batch_size` per epoch, and optimizer steps per epoch.
pub fn steps_per_epoch(samples: usize, batch_size: usize, grad_accum: usize) -> usize {
    samples.div_ceil(batch_size.max(1)).div_ceil(grad_accum.max(1))
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

fn to_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let (b, t) = (rows.len(), rows.first().map_or(0, |r| r.len()));
    Tensor::from_data(TensorData::new(rows.concat(), [b, t]), device)
}

impl<B: AutodiffBackend + HoneBackend> Trainer<B>
where
    B::InnerBackend: HoneBackend,
{
    /// `model` must already carry its LoRA adapters.
    pub fn new(model: CausalLm<B>, lora: LoraConfig, data: Vec<Sample>, cfg: TrainConfig, device: B::Device) -> Self {
        let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch(data.len(), cfg.batch_size, cfg.grad_accum) * cfg.epochs);
        let order = epoch_order(data.len(), cfg.seed, 0, cfg.shuffle);
        Trainer {
            model,
            lora,
            cfg,
            state: TrainState { step: 0, epoch: 0, position: 0, total_steps },
            moments: BTreeMap::new(),
            data,
            order,
            device,
        }
    }

    /// Training examples.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { kind: self.cfg.schedule, lr: self.cfg.lr, warmup_steps: self.cfg.warmup_steps, total_steps: self.state.total_steps }
    }

    /// The next `batch_size` sample indices, moving to the next epoch (and its order) at the end.
    fn next_indices(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.cfg.batch_size);
        while out.len() < self.cfg.batch_size {
            if self.state.position >= self.order.len() {
                if !out.is_empty() {
                    break; // the epoch's last, shorter batch
                }
                self.state.epoch += 1;
                self.state.position = 0;
                self.order = epoch_order(self.data.len(), self.cfg.seed, self.state.epoch, self.cfg.shuffle);
            }
            out.push(self.order[self.state.position]);
            self.state.position += 1;
        }
        out
    }

    /// One optimizer step; its loss stays on the device (see [`Trainer::step`] for a read).
    pub fn step_pending(&mut self) -> PendingStep<B::InnerBackend> {
        let step = self.state.step;
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        B::seed(&self.device, self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step as u64));
        let batches: Vec<Vec<usize>> = (0..self.cfg.grad_accum.max(1)).map(|_| self.next_indices()).collect();
        let padded: Vec<_> = batches
            .iter()
            .map(|idx| pad_batch(&idx.iter().map(|&i| &self.data[i]).collect::<Vec<_>>(), self.cfg.pad_id))
            .collect();
        let counted: usize = padded.iter().map(|(_, labels)| counted_tokens(labels)).sum();
        let tokens: usize = batches.iter().flatten().map(|&i| self.data[i].input_ids.len()).sum();
        let norm = counted.max(1) as f64;

        let mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>> = BTreeMap::new();
        let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
        for (ids, labels) in &padded {
            let ids_t = to_tensor::<B>(ids, &self.device);
            let labels_t = to_tensor::<B>(labels, &self.device);
            let nll = causal_lm_nll_sum(self.model.forward(ids_t), labels_t).div_scalar(norm);
            let g = nll.backward();
            loss_sum = Some(match loss_sum {
                Some(l) => l + nll.clone().inner(),
                None => nll.clone().inner(),
            });
            for (name, lin) in self.model.linears() {
                let Some(l) = &lin.lora else { continue };
                for (which, p) in [("lora_A", &l.lora_a), ("lora_B", &l.lora_b)] {
                    let key = format!("{name}.{which}");
                    let value = p.val();
                    let gp = value.grad(&g).unwrap_or_else(|| value.inner().zeros_like());
                    let acc = match grads.remove(&key) {
                        Some(prev) => prev + gp,
                        None => gp,
                    };
                    grads.insert(key, acc);
                }
            }
        }

        let keys: Vec<String> = grads.keys().cloned().collect();
        let mut list: Vec<Tensor<B::InnerBackend, 2>> = keys.iter().map(|k| grads[k].clone()).collect();
        let grad_norm = self.cfg.max_grad_norm.map(|max| clip_global_norm(&mut list, max));
        let clipped: BTreeMap<String, Tensor<B::InnerBackend, 2>> = keys.into_iter().zip(list).collect();

        let lr = self.schedule().lr_at(step);
        let adamw = self.cfg.adamw;
        for (name, lin) in self.model.linears_mut() {
            let Some(l) = &mut lin.lora else { continue };
            for which in ["lora_A", "lora_B"] {
                let key = format!("{name}.{which}");
                let param = if which == "lora_A" { &mut l.lora_a } else { &mut l.lora_b };
                let value = param.val().inner();
                let m = self.moments.entry(key.clone()).or_insert_with(|| Moments::zeros(value.dims(), &value.device()));
                let updated = adamw_update(value, clipped[&key].clone(), m, &adamw, lr, step + 1);
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
                tokens,
                trained_tokens: counted,
                grad_norm: None,
            },
        }
    }

    /// One optimizer step, its loss read back (native: a synchronous read).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self) -> StepReport {
        let pending = self.step_pending();
        let mut report = pending.report;
        report.loss = pending.loss_sum.into_data().to_vec::<f32>().expect("f32")[0] as f64;
        report.grad_norm = pending.grad_norm.map(|g| g.into_data().to_vec::<f32>().expect("f32")[0] as f64);
        report
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
    pub fn optimizer_state(&self) -> Vec<(String, [usize; 2], Vec<f32>, Vec<f32>)> {
        self.moments
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    m.exp_avg.dims(),
                    m.exp_avg.clone().into_data().to_vec().expect("f32"),
                    m.exp_avg_sq.clone().into_data().to_vec().expect("f32"),
                )
            })
            .collect()
    }

    /// The adapter's tensors read back asynchronously (the browser cannot read synchronously).
    pub async fn adapter_async(&self, base_model_name_or_path: &str) -> crate::Result<Adapter> {
        crate::lora::peft::to_host_async(self.model.linears(), &self.lora, base_model_name_or_path).await
    }

    /// [`Trainer::optimizer_state`], read back asynchronously.
    pub async fn optimizer_state_async(&self) -> crate::Result<Vec<(String, [usize; 2], Vec<f32>, Vec<f32>)>> {
        let mut out = Vec::with_capacity(self.moments.len());
        for (k, m) in &self.moments {
            out.push((k.clone(), m.exp_avg.dims(), read_f32(m.exp_avg.clone()).await?, read_f32(m.exp_avg_sq.clone()).await?));
        }
        Ok(out)
    }

    /// The model without autodiff, for [`evaluate_pending`] and generation.
    pub fn eval_model(&self) -> CausalLm<B::InnerBackend> {
        self.model.valid()
    }

    /// Restores a checkpoint: adapter tensors, optimizer moments and the data position.
    pub fn restore(&mut self, adapter: &Adapter, moments: Vec<(String, [usize; 2], Vec<f32>, Vec<f32>)>, state: TrainState) -> crate::Result<()> {
        adapter.attach(self.model.linears_mut(), &self.device)?;
        let inner = self.model.model.embed_tokens.clone().inner().device();
        self.moments = moments
            .into_iter()
            .map(|(k, shape, m, v)| {
                (k, Moments { exp_avg: Tensor::from_data(TensorData::new(m, shape), &inner), exp_avg_sq: Tensor::from_data(TensorData::new(v, shape), &inner) })
            })
            .collect();
        self.order = epoch_order(self.data.len(), self.cfg.seed, state.epoch, self.cfg.shuffle);
        self.state = state;
        Ok(())
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }
}

/// The summed loss over `samples`, left on the device (one read at the end, not one per batch),
/// and the number of tokens it counts.
pub fn evaluate_pending<B: HoneBackend>(model: &CausalLm<B>, samples: &[Sample], batch_size: usize, pad: u32, device: &B::Device) -> (Tensor<B, 1>, usize) {
    let mut sum: Option<Tensor<B, 1>> = None;
    let mut count = 0usize;
    for chunk in samples.chunks(batch_size.max(1)) {
        let (ids, labels) = pad_batch(&chunk.iter().collect::<Vec<_>>(), pad);
        count += counted_tokens(&labels);
        let nll = causal_lm_nll_sum(model.forward(to_tensor::<B>(&ids, device)), to_tensor::<B>(&labels, device));
        sum = Some(match sum {
            Some(s) => s + nll,
            None => nll,
        });
    }
    (sum.unwrap_or_else(|| Tensor::zeros([1], device)), count)
}

/// Loss and perplexity from a summed loss and its token count.
pub fn eval_report(sum: f64, count: usize) -> EvalReport {
    let loss = sum / count.max(1) as f64;
    EvalReport { loss, perplexity: loss.exp(), tokens: count }
}

/// Loss and perplexity of `model` over `samples` (no gradients).
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate<B: HoneBackend>(model: &CausalLm<B>, samples: &[Sample], batch_size: usize, pad: u32, device: &B::Device) -> EvalReport {
    let mut sum = 0f64;
    let mut count = 0usize;
    for chunk in samples.chunks(batch_size.max(1)) {
        let (ids, labels) = pad_batch(&chunk.iter().collect::<Vec<_>>(), pad);
        count += counted_tokens(&labels);
        let nll = causal_lm_nll_sum(model.forward(to_tensor::<B>(&ids, device)), to_tensor::<B>(&labels, device));
        sum += nll.into_data().to_vec::<f32>().expect("f32")[0] as f64;
    }
    let loss = sum / count.max(1) as f64;
    EvalReport { loss, perplexity: loss.exp(), tokens: count }
}

