//! A linear layer: a frozen base weight (dense or NF4), an optional bias, and an optional
//! LoRA adapter: `y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ`.

use crate::ops::HoneBackend;
use crate::quant::FrozenWeight;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

/// The trainable pair, in PEFT's layout: A `[r, in]`, B `[out, r]`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub scaling: f64,
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// `s·dropout(x)·Aᵀ·Bᵀ` for `x: [m, in]`. Dropout only while training: when gradients are
    /// tracked, or inside [`with_training_dropout`].
    /// Whether dropout applies to `x` now: a positive rate, while training.
    pub fn drops(&self, x: &Tensor<B, 2>) -> bool {
        self.dropout > 0.0 && (B::ad_enabled(&x.device()) || TRAINING_WITHOUT_GRAD.with(|t| t.get()))
    }

    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = if self.drops(&x) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask / keep
        } else {
            x
        };
        x.matmul(self.lora_a.val().transpose()).matmul(self.lora_b.val().transpose()).mul_scalar(self.scaling)
    }

    /// `s·B·A`, the `[out, in]` update a merge adds to the base weight.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()).mul_scalar(self.scaling)
    }
}

thread_local! {
    static TRAINING_WITHOUT_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every LoRA adapter switched off: the frozen base alone, as PEFT's
/// `disable_adapter()` (DPO's reference model, with no second copy of the weights).
pub fn without_adapters<R>(f: impl FnOnce() -> R) -> R {
    let before = ADAPTERS_OFF.with(|t| t.replace(true));
    let out = f();
    ADAPTERS_OFF.with(|t| t.set(before));
    out
}

/// Runs `f` with LoRA dropout on although no gradients are tracked: activation checkpointing's
/// first forward runs untracked and must see the same dropout as the tracked recomputation.
pub fn with_training_dropout<R>(f: impl FnOnce() -> R) -> R {
    let before = TRAINING_WITHOUT_GRAD.with(|t| t.replace(true));
    let out = f();
    TRAINING_WITHOUT_GRAD.with(|t| t.set(before));
    out
}

#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub weight: FrozenWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
    pub lora: Option<Lora<B>>,
}

impl<B: HoneBackend> LoraLinear<B> {
    pub fn new(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        LoraLinear { weight, bias, lora: None }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let x = x.reshape([b * t, d_in]);
        let lora = self.lora.as_ref().filter(|_| !ADAPTERS_OFF.with(|t| t.get()));
        let mut y = match lora {
            // Without dropout, base and update read the same x: one fused op.
            Some(lora) if !lora.drops(&x) => B::frozen_matmul_lowrank(x, &self.weight, lora.lora_a.val(), lora.lora_b.val(), lora.scaling),
            Some(lora) => B::frozen_matmul(x.clone(), &self.weight) + lora.delta(x),
            None => B::frozen_matmul(x, &self.weight),
        };
        if let Some(bias) = &self.bias {
            y = y + bias.clone().unsqueeze_dim(0);
        }
        y.reshape([b, t, self.out_features()])
    }
}
