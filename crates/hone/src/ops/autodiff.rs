//! hone's ops under burn's autodiff: each op is one node of the graph with its own backward
//! (the inner backend computes both ways). Frozen weights get no gradient; their backward
//! dequantizes again from the stored codes rather than keeping a dense copy.

use super::{FrozenWeight, HoneBackend, SAVE_DEQUANTIZED_FOR_BACKWARD};
use crate::quant::frozen::StoredFloat;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive};

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Keeps `gate` and `up` (the inputs; the output is not needed).
#[derive(Debug)]
struct SwigluBackward;

impl<B: HoneBackend> Backward<B, 2> for SwigluBackward {
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

impl<B: HoneBackend> Backward<B, 1> for CrossEntropyBackward {
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

impl<B: HoneBackend> Backward<B, 2> for RmsNormBackward {
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

impl<B: HoneBackend> Backward<B, 3> for AttentionBackward {
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

impl<B: HoneBackend, const D: usize> Backward<B, 2> for MatmulBackward<D> {
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


/// Backward of `x·Wᵀ` for a frozen W. Its state is the frozen weight itself: for NF4 the
/// packed codes (a handle, no copy), dequantized again only here.
#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: HoneBackend> Backward<B, 1> for FrozenMatmulBackward {
    type State = FrozenWeight<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            let dy = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            let dx = B::frozen_matmul_backward(dy, &ops.state);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// Backward of `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`: keeps the frozen weight (a handle), x, A, B and
/// `t = x·Aᵀ` (`[m, r]`), and gives x, A and B their gradients in one call.
#[derive(Debug)]
struct LowrankBackward;

/// What [`LowrankBackward`] keeps from the forward pass.
#[derive(Debug, Clone)]
struct LowrankState<B: HoneBackend> {
    w: FrozenWeight<B>,
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    t: FloatTensor<B>,
    scaling: f64,
}

impl<B: HoneBackend> Backward<B, 3> for LowrankBackward {
    type State = LowrankState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let grads_of = B::lowrank_backward(float(dy), float(s.x), &s.w, float(s.a), float(s.b), float(s.t), s.scaling);
        for (parent, g) in ops.parents.into_iter().zip(grads_of) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// Backward of a copy between devices: the gradient goes back to where `x` was.
#[derive(Debug)]
struct MoveBackward<const D: usize>;

impl<B: HoneBackend, const D: usize> Backward<B, 1> for MoveBackward<D> {
    type State = B::Device;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            let g = B::move_to(Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grad)), &ops.state);
            grads.register::<B>(node.id, g.into_primitive().tensor());
        }
    }
}


impl<B: HoneBackend, C: CheckpointStrategy> HoneBackend for Autodiff<B, C> {
    /// Frozen tables get no gradient: the rows are a constant of the graph.
    fn frozen_rows(w: &FrozenWeight<Self>, ids: Tensor<Self, 1, Int>) -> Tensor<Self, 2> {
        let inner: FrozenWeight<B> = w.valid();
        Tensor::from_inner(B::frozen_rows(&inner, ids.inner()))
    }

    fn device_memory(device: &Self::Device) -> Option<super::DeviceMemory> {
        B::device_memory(device)
    }

    fn tables_on_host() -> bool {
        B::tables_on_host()
    }

    fn unpack_words(words: Tensor<Self, 1, Int>, format: StoredFloat) -> Tensor<Self, 1> {
        Tensor::from_inner(B::unpack_words(words.inner(), format))
    }

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

    fn move_to<const D: usize>(x: Tensor<Self, D>, device: &Self::Device) -> Tensor<Self, D> {
        let x = x.into_primitive().tensor();
        let from = B::float_device(&x.primitive);
        let y = B::move_to(Tensor::<B, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone())), device).into_primitive().tensor();
        let out = match MoveBackward::<D>.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(from, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn frozen_matmul_lowrank(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> Tensor<Self, 2> {
        if SAVE_DEQUANTIZED_FOR_BACKWARD.load(std::sync::atomic::Ordering::Relaxed) {
            return Self::frozen_matmul(x.clone(), w) + x.matmul(a.transpose()).matmul(b.transpose()).mul_scalar(scaling);
        }
        let inner_w: FrozenWeight<B> = w.valid();
        let (x, a, b) = (x.into_primitive().tensor(), a.into_primitive().tensor(), b.into_primitive().tensor());
        let (y, t) = B::lowrank_forward(float(x.primitive.clone()), &inner_w, float(a.primitive.clone()), float(b.primitive.clone()), scaling);
        let y = y.into_primitive().tensor();
        let out = match LowrankBackward.prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = LowrankState { w: inner_w, x: x.primitive, a: a.primitive, b: b.primitive, t: t.into_primitive().tensor(), scaling };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        if SAVE_DEQUANTIZED_FOR_BACKWARD.load(std::sync::atomic::Ordering::Relaxed) {
            return x.matmul(w.to_dense().transpose());
        }
        let inner_w: FrozenWeight<B> = w.valid();
        let x = x.into_primitive().tensor();
        let y = B::frozen_matmul(Tensor::from_primitive(TensorPrimitive::Float(x.primitive.clone())), &inner_w);
        let y = y.into_primitive().tensor();
        let out = match FrozenMatmulBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(inner_w, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
