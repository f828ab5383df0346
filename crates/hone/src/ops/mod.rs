//! Fused elementwise ops with their own backward: SwiGLU (`silu(gate) * up`) and the
//! cross-entropy of rows of logits. Every backend gets them from burn's tensor ops (the
//! defaults); the CPU backend runs each as one threaded pass over its arrays (`cpu`), where
//! burn's ops take several passes and allocations per op (its sigmoid alone is five: measured
//! at 7% of a SmolLM2 training step, the loss's exp/log at as much again).

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod cpu;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

/// Sizes of one self-attention call: `batch` rows of `seq` tokens, `heads` query heads sharing
/// `kv_heads` key/value heads (grouped-query attention), `head_dim` values per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The scalars of one AdamW update, in `torch.optim.AdamW`'s order of operations (see
/// `train::optim`): `p·decay`, `m + (g − m)·beta1_weight`, `v·beta2 + g²·beta2_weight`,
/// `p − m / (√v / bias_correction2_sqrt + eps) · step_size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub decay: f64,
    pub beta1_weight: f64,
    pub beta2: f64,
    pub beta2_weight: f64,
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
    pub step_size: f64,
}

/// Up to how many multiply-adds (`batch·m·k·n`) GPU backends run a matrix product with hone's
/// barrier-free kernel (`shaders/src/matmul.rs`) instead of burn's tiled one: 0 (never) on real
/// GPUs; every size on SwiftShader (the browser's software adapter), where burn's kernel was 5-10x
/// slower at every size measured; small products only on lavapipe and llvmpipe, where burn's
/// kernel is 2-5x faster on SmolLM2's linears but hone's wins on small ones.
static REGISTER_MATMUL_LIMIT: AtomicU64 = AtomicU64::new(0);

/// hone's matmul kernel for products of every size (`true`) or none (see
/// [`REGISTER_MATMUL_LIMIT`]); the front ends call this once they know the adapter's kind.
pub fn use_register_matmul(on: bool) {
    use_register_matmul_up_to(if on { u64::MAX } else { 0 });
}

/// hone's matmul kernel for products of at most `max_macs` multiply-adds.
pub fn use_register_matmul_up_to(max_macs: u64) {
    REGISTER_MATMUL_LIMIT.store(max_macs, Ordering::Relaxed);
}

/// Whether a product of `macs` multiply-adds runs on hone's kernel.
pub fn register_matmul_for(macs: u64) -> bool {
    let limit = REGISTER_MATMUL_LIMIT.load(Ordering::Relaxed);
    limit > 0 && macs <= limit
}

/// `batch·m·k·n` of `a · b` for `[.., m, k]` and `[.., k, n]` (batch dimensions broadcast).
fn macs<const D: usize>(a: &[usize; D], b: &[usize; D]) -> u64 {
    let batch: usize = (0..D - 2).map(|d| a[d].max(b[d])).product();
    (batch * a[D - 2] * a[D - 1] * b[D - 1]) as u64
}

/// Targets below zero (transformers' -100) are not counted. The defaults are burn's tensor ops
/// ([`reference`]).
pub trait FusedOps: Backend {
    /// `a · b` for `[.., m, k]` and `[.., k, n]` (burn's matmul by default).
    fn matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        a.matmul(b)
    }

    /// `silu(gate) * up`, both `[rows, cols]`.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::swiglu(gate, up)
    }

    /// The gradients of [`FusedOps::swiglu`] with respect to `gate` and `up`, given `dy`.
    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        reference::swiglu_backward(gate, up, dy)
    }

    /// RMSNorm of each row of `x: [rows, d]`, `x / √(mean(x²) + eps) · w`, and each row's
    /// `1 / √(mean(x²) + eps)` `[rows]`, which the backward reuses.
    fn rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        reference::rms_norm(x, w, eps)
    }

    /// The gradients of [`FusedOps::rms_norm`] with respect to `x` and `w`, given `dy`.
    fn rms_norm_backward(x: Tensor<Self, 2>, w: Tensor<Self, 1>, r: Tensor<Self, 1>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        reference::rms_norm_backward(x, w, r, dy)
    }

    /// One AdamW update: the new parameter and moments `[param, exp_avg, exp_avg_sq]`.
    fn adamw(param: Tensor<Self, 2>, grad: Tensor<Self, 2>, exp_avg: Tensor<Self, 2>, exp_avg_sq: Tensor<Self, 2>, s: AdamWScalars) -> [Tensor<Self, 2>; 3] {
        reference::adamw(param, grad, exp_avg, exp_avg_sq, s)
    }

    /// Self-attention over tokens laid out as the projections give them: `q` `[B·T, H·D]`,
    /// `k`, `v` `[B·T, KV·D]`; RoPE (transformers' rotate-half on the first `rot` dims, tables
    /// `cos`, `sin` `[1 or B, 1, T, rot]`) on q and k, scores scaled by `1/√D` plus the additive
    /// `mask` `[1 or B, 1, T, T]`, softmax, times v. Returns the output `[B·T, H·D]` (what
    /// o_proj reads) and the probabilities `[B·H·T·T]` (for the backward), or `None` where the
    /// backend has no fused version and the decoder uses tensor ops.
    fn self_attention(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], mask: Tensor<Self, 4>, shape: AttentionShape) -> Option<(Tensor<Self, 2>, Tensor<Self, 1>)> {
        let _ = (q, k, v, rope, mask, shape);
        None
    }

    /// The gradients of [`FusedOps::self_attention`] with respect to q, k and v, given the output's
    /// gradient `dy` and the forward's probabilities. Only called where `self_attention` gave `Some`.
    #[allow(clippy::too_many_arguments)]
    fn self_attention_backward(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], probs: Tensor<Self, 1>, dy: Tensor<Self, 2>, shape: AttentionShape) -> [Tensor<Self, 2>; 3] {
        let _ = (q, k, v, rope, probs, dy, shape);
        unreachable!("self_attention_backward without a fused attention")
    }

    /// Per row of `logits: [rows, vocab]`: `-log softmax(row)[target]` (0 where the target is
    /// negative), and the row's log-sum-exp, which the backward reuses.
    fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        reference::cross_entropy(logits, targets)
    }

    /// The gradient of [`FusedOps::cross_entropy`]'s first output with respect to the logits:
    /// `dy · (softmax − onehot(target))` on counted rows, 0 on the others.
    fn cross_entropy_backward(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>, lse: Tensor<Self, 1>, dy: Tensor<Self, 1>) -> Tensor<Self, 2> {
        reference::cross_entropy_backward(logits, targets, lse, dy)
    }
}

/// The fused ops written with burn's tensor ops: what every backend without its own version
/// runs, and what the CPU versions are tested against.
pub mod reference {
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
}

/// A CubeCL tensor's primitive with its values laid out contiguously from offset 0 (what
/// hone's elementwise kernels index).
fn contiguous<R, F, I, BT>(t: Tensor<burn_cubecl::CubeBackend<R, F, I, BT>, 2>) -> burn_cubecl::tensor::CubeTensor<R>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    burn_cubecl::kernel::into_contiguous(t.into_primitive().tensor())
}

impl<R, F, I, BT> FusedOps for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    /// hone's kernel where [`register_matmul_for`] says so (rank 2 to 4, f32), else burn's.
    fn matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        if !register_matmul_for(macs(&a.dims(), &b.dims())) || F::dtype() != burn::tensor::DType::F32 || !(2..=4).contains(&D) {
            return a.matmul(b);
        }
        let out = hone_shaders::matmul::matmul(a.into_primitive().tensor(), b.into_primitive().tensor());
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    /// One kernel each way (shaders/src/swiglu.rs) instead of seven and ten launches.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::swiglu(gate, up);
        }
        let out = hone_shaders::swiglu::swiglu(contiguous(gate), contiguous(up));
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out))
    }

    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::swiglu_backward(gate, up, dy);
        }
        let [dg, du] = hone_shaders::swiglu::swiglu_backward(contiguous(gate), contiguous(up), contiguous(dy)).map(|t| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t)));
        (dg, du)
    }

    /// One kernel (shaders/src/adamw.rs) instead of a dozen launches.
    fn adamw(param: Tensor<Self, 2>, grad: Tensor<Self, 2>, exp_avg: Tensor<Self, 2>, exp_avg_sq: Tensor<Self, 2>, s: AdamWScalars) -> [Tensor<Self, 2>; 3] {
        if F::dtype() != burn::tensor::DType::F32 {
            return reference::adamw(param, grad, exp_avg, exp_avg_sq, s);
        }
        let c = |x: f64| x as f32;
        let scalars = [c(s.decay), c(s.beta1_weight), c(s.beta2), c(s.beta2_weight), c(s.bias_correction2_sqrt), c(s.eps), c(s.step_size)];
        hone_shaders::adamw::adamw(contiguous(param), contiguous(grad), contiguous(exp_avg), contiguous(exp_avg_sq), scalars).map(|t| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t)))
    }
}

mod autodiff {
    use super::FusedOps;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, Tensor, TensorPrimitive};
    #[allow(unused_imports)]
    use burn::tensor::backend::AutodiffBackend;

    fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    /// Keeps `gate` and `up` (the inputs; the output is not needed).
    #[derive(Debug)]
    struct SwigluBackward;

    impl<B: FusedOps> Backward<B, 2> for SwigluBackward {
        type State = (burn::tensor::ops::FloatTensor<B>, burn::tensor::ops::FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [gate_node, up_node] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            let (gate, up) = ops.state;
            let (dgate, dup) = B::swiglu_backward(float(gate), float(up), float(dy));
            if let Some(node) = gate_node {
                grads.register::<B>(node.id, dgate.into_primitive().tensor());
            }
            if let Some(node) = up_node {
                grads.register::<B>(node.id, dup.into_primitive().tensor());
            }
        }
    }

    /// Keeps the logits (a handle to the head's output), the targets and each row's log-sum-exp.
    #[derive(Debug)]
    struct CrossEntropyBackward;

    impl<B: FusedOps> Backward<B, 1> for CrossEntropyBackward {
        type State = (burn::tensor::ops::FloatTensor<B>, burn::tensor::ops::IntTensor<B>, burn::tensor::ops::FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [parent] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            if let Some(node) = parent {
                let (logits, targets, lse) = ops.state;
                let dx = B::cross_entropy_backward(float(logits), Tensor::<B, 1, Int>::from_primitive(targets), float(lse), float(dy));
                grads.register::<B>(node.id, dx.into_primitive().tensor());
            }
        }
    }

    /// Keeps x, w and each row's `1/rms`.
    #[derive(Debug)]
    struct RmsNormBackward;

    impl<B: FusedOps> Backward<B, 2> for RmsNormBackward {
        type State = (burn::tensor::ops::FloatTensor<B>, burn::tensor::ops::FloatTensor<B>, burn::tensor::ops::FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let [x_node, w_node] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            let (x, w, r) = ops.state;
            let (dx, dw) = B::rms_norm_backward(float(x), float(w), float(r), float(dy));
            if let Some(node) = x_node {
                grads.register::<B>(node.id, dx.into_primitive().tensor());
            }
            if let Some(node) = w_node {
                grads.register::<B>(node.id, dw.into_primitive().tensor());
            }
        }
    }

    /// Keeps q, k, v (the projections' outputs), the RoPE tables and the probabilities.
    #[derive(Debug)]
    struct AttentionBackward;

    type Prim<B> = burn::tensor::ops::FloatTensor<B>;

    impl<B: FusedOps> Backward<B, 3> for AttentionBackward {
        type State = ([Prim<B>; 3], [Prim<B>; 2], Prim<B>, super::AttentionShape);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let ([q, k, v], [cos, sin], probs, shape) = ops.state;
            let d = B::self_attention_backward(float(q), float(k), float(v), [float(cos), float(sin)], float(probs), float(dy), shape);
            for (parent, g) in ops.parents.into_iter().zip(d) {
                if let Some(node) = parent {
                    grads.register::<B>(node.id, g.into_primitive().tensor());
                }
            }
        }
    }

    /// Backward of `a · b` (same batch dimensions on both sides): keeps both operands.
    #[derive(Debug)]
    struct MatmulBackward<const D: usize>;

    impl<B: FusedOps, const D: usize> Backward<B, 2> for MatmulBackward<D> {
        type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = float::<B, D>(grads.consume::<B>(&ops.node));
            let (a, b) = ops.state;
            let [pa, pb] = ops.parents;
            if let Some(node) = pa {
                let da = B::matmul(dy.clone(), float::<B, D>(b).swap_dims(D - 2, D - 1));
                grads.register::<B>(node.id, da.into_primitive().tensor());
            }
            if let Some(node) = pb {
                let db = B::matmul(float::<B, D>(a).swap_dims(D - 2, D - 1), dy);
                grads.register::<B>(node.id, db.into_primitive().tensor());
            }
        }
    }

    impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
        /// The backend's own matmul both ways where hone's kernel is chosen for the size (burn's
        /// autodiff would run burn's kernel in the backward; the backward's products have the
        /// forward's size); burn's autodiff matmul otherwise, and for broadcast batch dimensions.
        fn matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
            if !super::register_matmul_for(super::macs(&a.dims(), &b.dims())) || a.dims()[..D - 2] != b.dims()[..D - 2] {
                return a.matmul(b);
            }
            let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
            let y = B::matmul(float::<B, D>(a.primitive.clone()), float::<B, D>(b.primitive.clone())).into_primitive().tensor();
            let out = match MatmulBackward::<D>.prepare::<C>([a.node.clone(), b.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }

        fn self_attention(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], mask: Tensor<Self, 4>, shape: super::AttentionShape) -> Option<(Tensor<Self, 2>, Tensor<Self, 1>)> {
            let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
            let [cos, sin] = rope.map(|t| t.inner());
            let (out, probs) = B::self_attention(float(q.primitive.clone()), float(k.primitive.clone()), float(v.primitive.clone()), [cos.clone(), sin.clone()], mask.inner(), shape)?;
            let out = out.into_primitive().tensor();
            let out = match AttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let rope = [cos, sin].map(|t| t.into_primitive().tensor());
                    prep.finish(([q.primitive, k.primitive, v.primitive], rope, probs.clone().into_primitive().tensor(), shape), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            Some((Tensor::from_primitive(TensorPrimitive::Float(out)), Tensor::from_inner(probs)))
        }

        fn rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
            let x = x.into_primitive().tensor();
            let w = w.into_primitive().tensor();
            let (y, r) = B::rms_norm(float(x.primitive.clone()), float(w.primitive.clone()), eps);
            let y = y.into_primitive().tensor();
            let out = match RmsNormBackward.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive, r.clone().into_primitive().tensor()), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            (Tensor::from_primitive(TensorPrimitive::Float(out)), Tensor::from_inner(r))
        }

        fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let gate = gate.into_primitive().tensor();
            let up = up.into_primitive().tensor();
            let y = B::swiglu(float(gate.primitive.clone()), float(up.primitive.clone())).into_primitive().tensor();
            let out = match SwigluBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }

        fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
            let logits = logits.into_primitive().tensor();
            let targets = targets.into_primitive();
            let (nll, lse) = B::cross_entropy(float(logits.primitive.clone()), Tensor::<B, 1, Int>::from_primitive(targets.clone()));
            let nll = nll.into_primitive().tensor();
            let out = match CrossEntropyBackward.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((logits.primitive, targets, lse.clone().into_primitive().tensor()), nll),
                OpsKind::UnTracked(prep) => prep.finish(nll),
            };
            // The log-sum-exp is a by-product, never differentiated: a constant of the graph.
            (Tensor::from_primitive(TensorPrimitive::Float(out)), Tensor::from_inner(lse))
        }
    }
}
