//! A linear layer: a frozen base weight (dense or NF4), an optional bias, and an optional
//! LoRA adapter: `y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ`; or DoRA (PEFT's `use_dora`), which scales
//! each output by `m / ‖W + s·B·A‖` (row norms, detached): `y = (m/n)·(x·Wᵀ + s·x·Aᵀ·Bᵀ) + b`.

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
    /// DoRA's magnitude, when the adapter is a DoRA one.
    pub dora: Option<Dora<B>>,
}

/// DoRA's trainable magnitude `m` (PEFT's `lora_magnitude_vector`, kept as a `[1, out]` row so
/// that it scales the outputs by broadcasting) and the base's squared row norms `‖W_i‖²`,
/// computed once: with them the norms of `W + s·B·A` need no dense copy of W.
#[derive(Module, Debug)]
pub struct Dora<B: Backend> {
    pub magnitude: Param<Tensor<B, 2>>,
    pub base_norm_sq: Tensor<B, 2>,
}

/// The names of an adapter's trainable tensors, as PEFT's keys end.
pub const LORA_A: &str = "lora_A";
pub const LORA_B: &str = "lora_B";
pub const MAGNITUDE: &str = "lora_magnitude_vector";

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

    /// `dropout(x)` while training, `x` otherwise.
    pub fn dropped(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.drops(&x) {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x * mask / keep
        } else {
            x
        }
    }

    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.dropped(x).matmul(self.lora_a.val().transpose()).matmul(self.lora_b.val().transpose()).mul_scalar(self.scaling)
    }

    /// The trainable tensors by PEFT's names: A, B, and DoRA's magnitude when there is one.
    pub fn params(&self) -> Vec<(&'static str, &Param<Tensor<B, 2>>)> {
        let mut out = vec![(LORA_A, &self.lora_a), (LORA_B, &self.lora_b)];
        if let Some(d) = &self.dora {
            out.push((MAGNITUDE, &d.magnitude));
        }
        out
    }

    pub fn params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let mut out = vec![(LORA_A, &mut self.lora_a), (LORA_B, &mut self.lora_b)];
        if let Some(d) = &mut self.dora {
            out.push((MAGNITUDE, &mut d.magnitude));
        }
        out
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

thread_local! {
    /// DoRA's row norms memoized while a [`FixedAdapters`] guard lives, by the address of the
    /// adapter (stable: the model is borrowed for the guard's life), and how many guards live.
    static DORA_NORMS: std::cell::RefCell<(usize, std::collections::HashMap<usize, Box<dyn std::any::Any>>)> = Default::default();
}

/// While one lives, the adapters are not trained (generation borrows the model), so each DoRA
/// layer's `‖W + s·B·A‖` is computed once and reused: otherwise every decoded token would pay
/// `A·Wᵀ`, r times the token's own product with W.
pub struct FixedAdapters(());

impl FixedAdapters {
    pub fn begin() -> Self {
        DORA_NORMS.with(|c| c.borrow_mut().0 += 1);
        FixedAdapters(())
    }
}

impl Drop for FixedAdapters {
    fn drop(&mut self) {
        DORA_NORMS.with(|c| {
            let mut c = c.borrow_mut();
            c.0 -= 1;
            if c.0 == 0 {
                c.1.clear();
            }
        });
    }
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

    /// Makes the adapter a DoRA one: `magnitude` as given (read from a file), or PEFT's
    /// initial value, the row norms of `W + s·B·A` now.
    pub fn enable_dora(&mut self, magnitude: Option<Vec<f32>>) {
        let w = self.weight.to_dense();
        let base_norm_sq = w.clone().mul(w).sum_dim(1).transpose().detach();
        let lora = self.lora.as_mut().expect("an adapter to make DoRA");
        lora.dora = Some(Dora { magnitude: Param::from_tensor(base_norm_sq.clone()), base_norm_sq });
        let magnitude = match magnitude {
            Some(m) => Tensor::from_data(burn::tensor::TensorData::new(m, [1, self.out_features()]), &self.weight.device()),
            None => self.dora_norm_now(self.lora.as_ref().expect("set above")),
        };
        self.lora.as_mut().expect("set above").dora.as_mut().expect("set above").magnitude = Param::from_tensor(magnitude);
    }

    /// `‖W + s·B·A‖` per output row, `[1, out]`, detached (PEFT detaches it: the gradient does
    /// not flow through the norm). Expanded as `‖W_i‖² + 2s·(B ⊙ (A·Wᵀ)ᵀ)_i + s²·(B·A·Aᵀ ⊙ B)_i`,
    /// so W enters only through `A·Wᵀ`, the frozen matmul of r rows (NF4 stays NF4).
    fn dora_norm(&self, lora: &Lora<B>) -> Tensor<B, 2> {
        let key = lora as *const Lora<B> as usize;
        let fixed = DORA_NORMS.with(|c| c.borrow().0 > 0) && !B::ad_enabled(&self.weight.device());
        if fixed {
            if let Some(n) = DORA_NORMS.with(|c| c.borrow().1.get(&key).and_then(|n| n.downcast_ref::<Tensor<B, 2>>().cloned())) {
                return n;
            }
        }
        let norm = self.dora_norm_now(lora);
        if fixed {
            DORA_NORMS.with(|c| c.borrow_mut().1.insert(key, Box::new(norm.clone())));
        }
        norm
    }

    fn dora_norm_now(&self, lora: &Lora<B>) -> Tensor<B, 2> {
        let dora = lora.dora.as_ref().expect("a DoRA adapter");
        let (a, b, s) = (lora.lora_a.val().detach(), lora.lora_b.val().detach(), lora.scaling);
        let aw = B::frozen_matmul(a.clone(), &self.weight); // [r, out]
        let cross = b.clone().transpose().mul(aw).sum_dim(0); // [1, out]
        let bab = b.clone().matmul(a.clone().matmul(a.transpose())).mul(b).transpose().sum_dim(0); // [1, out]
        let sq = dora.base_norm_sq.clone() + cross.mul_scalar(2.0 * s) + bab.mul_scalar(s * s);
        sq.clamp_min(0.0).sqrt().detach()
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let x = x.reshape([b * t, d_in]);
        let lora = self.lora.as_ref().filter(|_| !ADAPTERS_OFF.with(|t| t.get()));
        let mut y = match lora {
            // DoRA, PEFT's forward: base(x) + (g - 1)·base(x') + g·s·x'·Aᵀ·Bᵀ with g = m / ‖W + s·B·A‖
            // and x' = dropout(x); without dropout (x' = x) that is g·(x·Wᵀ + s·x·Aᵀ·Bᵀ), one fused op.
            Some(lora @ Lora { dora: Some(dora), .. }) => {
                let g = dora.magnitude.val() / self.dora_norm(lora);
                let (a, bm) = (lora.lora_a.val(), lora.lora_b.val());
                if lora.drops(&x) {
                    let xd = lora.dropped(x.clone());
                    B::frozen_matmul(x - xd.clone(), &self.weight) + B::frozen_matmul_lowrank(xd, &self.weight, a, bm, lora.scaling) * g
                } else {
                    B::frozen_matmul_lowrank(x, &self.weight, a, bm, lora.scaling) * g
                }
            }
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
