//! Causal-LM cross-entropy as transformers computes it: logits at position t predict the label
//! at t+1; labels of -100 are ignored; the mean is over the counted tokens.

use crate::ops::HoneBackend;
use burn::tensor::{Int, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// Summed negative log-likelihood over the counted tokens, `[1]`.
/// `logits: [B, T, V]`, `labels: [B, T]`.
pub fn causal_lm_nll_sum<B: HoneBackend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t] = labels.dims();
    // Shift the labels, not the logits: the last position predicts nothing, and the logits stay
    // one contiguous array (a narrowed copy of them is the largest buffer of a step).
    let none = Tensor::<B, 2, Int>::full([b, 1], IGNORE_INDEX, &labels.device());
    let targets = Tensor::cat(vec![labels.narrow(1, 1, t - 1), none], 1);
    nll_sum(logits, targets)
}

/// Summed negative log-likelihood of `targets` (already shifted: the token each position
/// predicts, IGNORE_INDEX where none) under `logits: [B, T, V]`.
pub fn nll_sum<B: HoneBackend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    let (nll, _lse) = B::cross_entropy(logits.reshape([b * t, v]), targets.reshape([b * t]));
    nll.sum()
}

/// Host labels `[B][T]` shifted left by one: position t holds the label of t+1.
pub fn shifted_targets(labels: &[Vec<i64>]) -> Vec<Vec<i64>> {
    labels.iter().map(|row| row.iter().skip(1).copied().chain(std::iter::once(IGNORE_INDEX)).collect()).collect()
}

/// Number of tokens the loss counts for host-side labels `[B][T]` (after the shift).
pub fn counted_tokens(labels: &[Vec<i64>]) -> usize {
    labels.iter().map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum()
}

/// Mean loss `[1]`.
pub fn causal_lm_loss<B: HoneBackend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let keep = labels.clone().narrow(1, 1, labels.dims()[1] - 1).not_equal_elem(IGNORE_INDEX).float().sum();
    causal_lm_nll_sum(logits, labels) / keep
}
