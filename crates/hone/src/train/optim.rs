//! AdamW on the LoRA parameters, in PyTorch's order of operations (`torch.optim.AdamW`,
//! single-tensor path) or as bitsandbytes' 8-bit AdamW ([`super::adamw8bit`]), and global-norm
//! gradient clipping as `clip_grad_norm_`.

use crate::ops::{AdamWScalars, HoneBackend};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Which optimizer: AdamW with f32 moments (`torch.optim.AdamW`), or bitsandbytes' 8-bit AdamW
/// (blockwise 8-bit moments; transformers' `adamw_bnb_8bit` / `paged_adamw_8bit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optim {
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    #[serde(rename = "adamw_8bit")]
    AdamW8bit,
}

impl Optim {
    /// Accepts hone's names and transformers' `optim` names for the same optimizers.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "adamw" | "adamw_torch" | "adamw_torch_fused" => Ok(Optim::AdamW),
            "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" => Ok(Optim::AdamW8bit),
            other => Err(format!("unknown optimizer {other:?}: expected adamw (also adamw_torch) or adamw_8bit (also adamw_bnb_8bit, paged_adamw_8bit)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Optim::AdamW => "adamw",
            Optim::AdamW8bit => "adamw_8bit",
        }
    }
}

/// The moments of one parameter, as the optimizer keeps them on the device.
#[derive(Debug, Clone)]
pub enum OptimState<B: Backend> {
    F32(Moments<B>),
    Int8(super::adamw8bit::Int8Moments<B>),
}

/// The same on the host, as a checkpoint stores them.
#[derive(Debug, Clone, PartialEq)]
pub enum HostMoments {
    F32 { exp_avg: Vec<f32>, exp_avg_sq: Vec<f32> },
    Int8(super::adamw8bit::HostInt8Moments),
}

/// One parameter's saved moments: its name, shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedMoments {
    pub name: String,
    pub shape: [usize; 2],
    pub moments: HostMoments,
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 2>,
    pub exp_avg_sq: Tensor<B, 2>,
}

impl<B: Backend> Moments<B> {
    pub fn zeros(shape: [usize; 2], device: &B::Device) -> Self {
        Moments { exp_avg: Tensor::zeros(shape, device), exp_avg_sq: Tensor::zeros(shape, device) }
    }
}

/// One AdamW update of `param` with `grad`; `step` counts from 1.
pub fn adamw_update<B: HoneBackend>(param: Tensor<B, 2>, grad: Tensor<B, 2>, m: &mut Moments<B>, cfg: &AdamWConfig, lr: f64, step: usize) -> Tensor<B, 2> {
    let scalars = AdamWScalars {
        decay: 1.0 - lr * cfg.weight_decay,
        // torch's lerp(exp_avg, grad, 1 - beta1) for a weight below one half.
        beta1_weight: 1.0 - cfg.beta1,
        beta2: cfg.beta2,
        beta2_weight: 1.0 - cfg.beta2,
        bias_correction2_sqrt: (1.0 - cfg.beta2.powi(step as i32)).sqrt(),
        eps: cfg.eps,
        step_size: lr / (1.0 - cfg.beta1.powi(step as i32)),
    };
    let [param, exp_avg, exp_avg_sq] = B::adamw(param, grad, m.exp_avg.clone(), m.exp_avg_sq.clone(), scalars);
    (m.exp_avg, m.exp_avg_sq) = (exp_avg, exp_avg_sq);
    param
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (as `clip_grad_norm_`:
/// coefficient `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm before clipping,
/// as a device scalar (no host read).
pub fn clip_global_norm<B: crate::ops::HoneBackend>(grads: &mut [Tensor<B, 2>], max_norm: f64) -> Tensor<B, 1> {
    // Gradients of layers on other devices send their norm (one value) to the first's.
    let home = grads.first().map(|g| g.device()).unwrap_or_default();
    let norms: Vec<Tensor<B, 1>> = grads.iter().map(|g| crate::model::decoder::onto(g.clone().square().sum().sqrt(), &home)).collect();
    let total = Tensor::cat(norms, 0).square().sum().sqrt();
    let coef = (total.clone().add_scalar(1e-6).recip().mul_scalar(max_norm)).clamp_max(1.0);
    for g in grads.iter_mut() {
        let device = g.device();
        *g = g.clone() * crate::model::decoder::onto(coef.clone(), &device).unsqueeze_dim::<2>(0);
    }
    total
}
