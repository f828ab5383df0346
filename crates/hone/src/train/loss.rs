//! Causal-LM cross-entropy as transformers computes it: logits at position t predict the label
//! at t+1; labels of -100 are ignored; the mean is over the counted tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

pub const IGNORE_INDEX: i64 = -100;

/// `logits: [B, T, V]`, `labels: [B, T]` → scalar loss `[1]`.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    let logits = logits.narrow(1, 0, t - 1);
    let labels = labels.narrow(1, 1, t - 1);
    let keep = labels.clone().not_equal_elem(IGNORE_INDEX);
    let safe = labels.clamp_min(0);
    let logp = log_softmax(logits.reshape([b * (t - 1), v]), 1);
    let picked = logp.gather(1, safe.reshape([b * (t - 1), 1])).reshape([b * (t - 1)]);
    let keep = keep.reshape([b * (t - 1)]).float();
    let count = keep.clone().sum();
    -(picked * keep).sum() / count
}
