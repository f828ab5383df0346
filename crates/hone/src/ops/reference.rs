//! The fused ops written with burn's tensor ops: what every backend without its own version
//! runs, and what the CPU versions are tested against.

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

pub fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

pub fn swiglu_backward<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>, dy: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let s = sigmoid(gate.clone());
    let silu = gate.clone() * s.clone();
    // d silu / dg = σ(g) · (1 + g · (1 − σ(g)))
    let dsilu = s.clone() * (gate * s.neg().add_scalar(1.0)).add_scalar(1.0);
    (dy.clone() * up * dsilu, dy * silu)
}

pub fn adamw<B: Backend>(param: Tensor<B, 2>, grad: Tensor<B, 2>, exp_avg: Tensor<B, 2>, exp_avg_sq: Tensor<B, 2>, s: super::AdamWScalars) -> [Tensor<B, 2>; 3] {
    let param = param.mul_scalar(s.decay);
    let exp_avg = exp_avg.clone() + (grad.clone() - exp_avg).mul_scalar(s.beta1_weight);
    let exp_avg_sq = exp_avg_sq.mul_scalar(s.beta2) + (grad.clone() * grad).mul_scalar(s.beta2_weight);
    let denom = exp_avg_sq.clone().sqrt().div_scalar(s.bias_correction2_sqrt).add_scalar(s.eps);
    [param - (exp_avg.clone() / denom).mul_scalar(s.step_size), exp_avg, exp_avg_sq]
}

pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let [rows, _] = x.dims();
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    (x * r.clone() * w.unsqueeze_dim(0), r.reshape([rows]))
}

/// `x̂ = x·r`, `g = dy·w`: `dx = r·(g − x̂·mean(g·x̂))`, `dw = Σ_rows dy·x̂`.
pub fn rms_norm_backward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, r: Tensor<B, 1>, dy: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let [rows, d] = x.dims();
    let r = r.reshape([rows, 1]);
    let xhat = x * r.clone();
    let g = dy.clone() * w.unsqueeze_dim(0);
    let dw = (dy * xhat.clone()).sum_dim(0).reshape([d]);
    let dot = (g.clone() * xhat.clone()).mean_dim(1);
    ((g - xhat * dot) * r, dw)
}

pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [rows, _] = logits.dims();
    let max = logits.clone().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let keep = targets.clone().greater_equal_elem(0).float();
    let picked = logits.gather(1, targets.clamp_min(0).reshape([rows, 1]));
    let lse = lse.reshape([rows]);
    ((lse.clone() - picked.reshape([rows])) * keep, lse)
}

pub fn cross_entropy_backward<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, lse: Tensor<B, 1>, dy: Tensor<B, 1>) -> Tensor<B, 2> {
    let [rows, vocab] = logits.dims();
    let keep = targets.clone().greater_equal_elem(0).float();
    let scale = (dy * keep).reshape([rows, 1]);
    let softmax = (logits - lse.reshape([rows, 1])).exp();
    let onehot = targets.clamp_min(0).reshape([rows, 1]).equal(Tensor::<B, 1, Int>::arange(0..vocab as i64, &softmax.device()).reshape([1, vocab])).float();
    (softmax - onehot) * scale
}
