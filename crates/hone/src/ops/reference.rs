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

/// transformers' rotate-half RoPE on the first `rot` dims of `x` `[B, N, T, D]` (`rot` is the
/// tables' last dimension; the rest pass through), or its transpose (`inverse`: the backward,
/// `dx = dy·cos + rotate_halfᵀ(dy·sin)`, `rotate_halfᵀ([z1, z2]) = [z2, −z1]`).
fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>, inverse: bool) -> Tensor<B, 4> {
    let (d, rot) = (x.dims()[3], cos.dims()[3]);
    let half = rot / 2;
    let x_rot = x.clone().narrow(3, 0, rot);
    let out = if inverse {
        let z = x_rot.clone() * sin.clone();
        let turned = Tensor::cat(vec![z.clone().narrow(3, half, half), z.narrow(3, 0, half).neg()], 3);
        x_rot * cos.clone() + turned
    } else {
        let turned = Tensor::cat(vec![x_rot.clone().narrow(3, half, half).neg(), x_rot.clone().narrow(3, 0, half)], 3);
        x_rot * cos.clone() + turned * sin.clone()
    };
    if rot == d {
        out
    } else {
        Tensor::cat(vec![out, x.narrow(3, rot, d - rot)], 3)
    }
}

/// `[B·T, N·D]` as heads `[B, N, T, D]`, and back.
fn to_heads<B: Backend>(y: Tensor<B, 2>, s: super::AttentionShape, n: usize) -> Tensor<B, 4> {
    y.reshape([s.batch, s.seq, n, s.head_dim]).swap_dims(1, 2)
}

fn from_heads<B: Backend>(y: Tensor<B, 4>, s: super::AttentionShape) -> Tensor<B, 2> {
    let n = y.dims()[1];
    y.swap_dims(1, 2).reshape([s.batch * s.seq, n * s.head_dim])
}

/// Each of the `kv_heads` heads repeated for the query heads that share it (head `g·rep + r`
/// reads kv head `g`, as transformers' `repeat_kv`).
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, s: super::AttentionShape) -> Tensor<B, 4> {
    let rep = s.heads / s.kv_heads;
    if rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.reshape([b, kv, 1, t * d]).repeat_dim(2, rep).reshape([b, kv * rep, t, d])
}

/// The transpose of [`repeat_kv`]: the query heads' gradients summed per kv head.
fn sum_kv<B: Backend>(x: Tensor<B, 4>, s: super::AttentionShape) -> Tensor<B, 4> {
    let rep = s.heads / s.kv_heads;
    if rep == 1 {
        return x;
    }
    let [b, _, t, d] = x.dims();
    x.reshape([b, s.kv_heads, rep, t * d]).sum_dim(2).reshape([b, s.kv_heads, t, d])
}

/// Self-attention as [`super::HoneBackend::self_attention`] defines it, in tensor ops. Run by a
/// backend without its own kernel, under autodiff it is still one graph node that keeps q, k,
/// v and the probabilities only: burn's own graph of these ops would also keep the scores, the
/// masked scores, softmax's intermediates and RoPE's copies (three or four `[B, H, T, T]`
/// tensors per layer instead of one).
pub fn self_attention<B: super::HoneBackend>(q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, [cos, sin]: [Tensor<B, 4>; 2], mask: Tensor<B, 4>, s: super::AttentionShape) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let q = rope(to_heads(q, s, s.heads), &cos, &sin, false);
    let k = repeat_kv(rope(to_heads(k, s, s.kv_heads), &cos, &sin, false), s);
    let v = repeat_kv(to_heads(v, s, s.kv_heads), s);
    let scores = B::matmul(q, k.swap_dims(2, 3)).mul_scalar((s.head_dim as f64).powf(-0.5)) + mask;
    let probs = burn::tensor::activation::softmax(scores, 3);
    let out = from_heads(B::matmul(probs.clone(), v), s);
    let n = probs.shape().num_elements();
    (out, probs.reshape([n]))
}

/// The gradients of [`self_attention`] with respect to q, k and v, from the forward's
/// probabilities `P`: `dV = Pᵀ·dY`, `dP = dY·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √D`,
/// `dQ = dS·K`, `dK = dSᵀ·Q` (kv heads summed over the query heads sharing them), then RoPE's
/// transpose on dQ and dK.
pub fn self_attention_backward<B: super::HoneBackend>(q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, [cos, sin]: [Tensor<B, 4>; 2], probs: Tensor<B, 1>, dy: Tensor<B, 2>, s: super::AttentionShape) -> [Tensor<B, 2>; 3] {
    let probs = probs.reshape([s.batch, s.heads, s.seq, s.seq]);
    let dy = to_heads(dy, s, s.heads);
    let dv = sum_kv(B::matmul(probs.clone().swap_dims(2, 3), dy.clone()), s);
    let v = repeat_kv(to_heads(v, s, s.kv_heads), s);
    let dp = B::matmul(dy, v.swap_dims(2, 3));
    let row = (dp.clone() * probs.clone()).sum_dim(3);
    let ds = (probs * (dp - row)).mul_scalar((s.head_dim as f64).powf(-0.5));
    let q = rope(to_heads(q, s, s.heads), &cos, &sin, false);
    let k = repeat_kv(rope(to_heads(k, s, s.kv_heads), &cos, &sin, false), s);
    let dq = rope(B::matmul(ds.clone(), k), &cos, &sin, true);
    let dk = rope(sum_kv(B::matmul(ds.swap_dims(2, 3), q), s), &cos, &sin, true);
    [from_heads(dq, s), from_heads(dk, s), from_heads(dv, s)]
}
