//! The fused ops (SwiGLU, RMSNorm, cross-entropy, self-attention, AdamW) against the same maths differentiated by burn's
//! autodiff: the CPU versions, and the tensor-op versions the GPU backends run, forward and
//! backward. (End to end they are also checked against PyTorch: lora_grads, train_parity.)

use burn::backend::{Autodiff, NdArray};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use hone::ops::{reference, AdamWScalars, AttentionShape, HoneBackend};
use burn::tensor::activation::softmax;
use hone::parity::rel_error;

type B = Autodiff<NdArray>;

fn values<const D: usize>(t: Tensor<impl burn::tensor::backend::Backend, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn random(shape: [usize; 2], scale: f64) -> Tensor<NdArray, 2> {
    Tensor::random(shape, Distribution::Uniform(-scale, scale), &Default::default())
}

#[test]
fn swiglu_matches_burns_autodiff_of_silu_times_up() {
    // Wide enough to reach sigmoid's flat ends, and more values than one parallel task.
    let (g, u, w) = (random([37, 1031], 20.0), random([37, 1031], 3.0), random([37, 1031], 1.0));
    let grads_of = |f: &dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>| {
        let gate = Tensor::<B, 2>::from_inner(g.clone()).require_grad();
        let up = Tensor::<B, 2>::from_inner(u.clone()).require_grad();
        let y = f(gate.clone(), up.clone());
        let grads = (y.clone() * Tensor::from_inner(w.clone())).sum().backward();
        (values(y), values(gate.grad(&grads).unwrap()), values(up.grad(&grads).unwrap()))
    };
    let want = grads_of(&|g, u| silu(g) * u);
    let fused = grads_of(&|g, u| B::swiglu(g, u));
    for (what, ours, theirs) in [("y", &fused.0, &want.0), ("dgate", &fused.1, &want.1), ("dup", &fused.2, &want.2)] {
        let e = rel_error(ours, theirs);
        println!("swiglu {what}: rel error {e:e}");
        assert!(e < 1e-6, "fused swiglu {what}: rel error {e:e}");
    }
    // The tensor-op backward (what wgpu and CUDA run) against burn's autodiff too.
    let (dg, du) = reference::swiglu_backward(g.clone(), u.clone(), w.clone());
    assert!(rel_error(&values(dg), &want.1) < 1e-6 && rel_error(&values(du), &want.2) < 1e-6);
}

#[test]
fn cross_entropy_matches_burns_autodiff_of_log_softmax() {
    let (rows, vocab) = (9, 5003);
    let logits = random([rows, vocab], 12.0);
    let t: Vec<i64> = vec![0, 17, -100, 5002, 4096, -100, 1, 2500, 77];
    let targets = || Tensor::<NdArray, 1, Int>::from_data(TensorData::new(t.clone(), [rows]), &Default::default());
    let weights = random([rows, 1], 1.0).reshape([rows]);

    let x = Tensor::<B, 2>::from_inner(logits.clone()).require_grad();
    let logp = log_softmax(x.clone(), 1);
    let picked = logp.gather(1, Tensor::from_inner(targets()).clamp_min(0).reshape([rows, 1])).reshape([rows]);
    let keep = Tensor::<B, 1, Int>::from_inner(targets()).greater_equal_elem(0).float();
    let want_nll = -(picked * keep);
    let grads = (want_nll.clone() * Tensor::from_inner(weights.clone())).sum().backward();
    let want_grad = values(x.grad(&grads).unwrap());
    let want_nll = values(want_nll);

    let x = Tensor::<B, 2>::from_inner(logits.clone()).require_grad();
    let (nll, lse) = B::cross_entropy(x.clone(), Tensor::from_inner(targets()));
    let grads = (nll.clone() * Tensor::from_inner(weights.clone())).sum().backward();
    let (ours_nll, ours_grad) = (values(nll), values(x.grad(&grads).unwrap()));
    let (e_nll, e_grad) = (rel_error(&ours_nll, &want_nll), rel_error(&ours_grad, &want_grad));
    println!("cross-entropy: nll rel error {e_nll:e}, dlogits rel error {e_grad:e}");
    assert!(e_nll < 1e-6 && e_grad < 1e-6, "fused cross-entropy: nll {e_nll:e}, dlogits {e_grad:e}");
    assert_eq!(ours_nll[2], 0.0, "an ignored row has no loss");
    assert!(ours_grad[2 * vocab..3 * vocab].iter().all(|&g| g == 0.0), "an ignored row has no gradient");

    // The tensor-op versions (wgpu, CUDA) against the same.
    let (nll, lse_ref) = reference::cross_entropy(logits.clone(), targets());
    assert!(rel_error(&values(nll), &want_nll) < 1e-6 && rel_error(&values(lse_ref.clone()), &values(lse)) < 1e-6);
    let dx = reference::cross_entropy_backward(logits, targets(), lse_ref, weights);
    assert!(rel_error(&values(dx), &want_grad) < 1e-6);
}

#[test]
#[should_panic(expected = "outside the vocabulary")]
fn a_target_outside_the_vocabulary_is_named() {
    let logits = random([2, 10], 1.0);
    let targets = Tensor::<NdArray, 1, Int>::from_data(TensorData::new(vec![3i64, 10], [2]), &Default::default());
    let _ = NdArray::cross_entropy(logits, targets);
}

#[test]
fn rms_norm_matches_burns_autodiff_of_the_formula() {
    let (rows, d, eps) = (23, 576, 1e-5);
    let (x0, w0, c) = (random([rows, d], 2.0), random([1, d], 1.0).reshape([d]), random([rows, d], 1.0));
    let run = |fused: bool| {
        let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
        let w = Tensor::<B, 1>::from_inner(w0.clone()).require_grad();
        let y = if fused {
            B::rms_norm(x.clone(), w.clone(), eps).0
        } else {
            // transformers' LlamaRMSNorm: x · rsqrt(mean(x²) + eps) · w
            x.clone() * (x.clone().square().mean_dim(1) + eps).sqrt().recip() * w.clone().unsqueeze_dim(0)
        };
        let grads = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
        (values(y), values(x.grad(&grads).unwrap()), values(w.grad(&grads).unwrap()))
    };
    let (ours, want) = (run(true), run(false));
    for (what, o, w) in [("y", &ours.0, &want.0), ("dx", &ours.1, &want.1), ("dw", &ours.2, &want.2)] {
        let e = rel_error(o, w);
        println!("rms_norm {what}: rel error {e:e}");
        assert!(e < 1e-6, "fused rms_norm {what}: rel error {e:e}");
    }
    let (_, r) = reference::rms_norm(x0.clone(), w0.clone(), eps);
    let (dx, dw) = reference::rms_norm_backward(x0, w0, r, c);
    assert!(rel_error(&values(dx), &want.1) < 1e-6 && rel_error(&values(dw), &want.2) < 1e-6);
}

/// transformers' attention with tensor ops: rotate-half RoPE on the first `rot` dims, kv heads
/// repeated, scaled scores plus mask, softmax, times v. q `[B·T, H·D]`, k/v `[B·T, KV·D]`.
fn attention_with_tensor_ops<A: burn::tensor::backend::Backend>(q: Tensor<A, 2>, k: Tensor<A, 2>, v: Tensor<A, 2>, cos: Tensor<A, 4>, sin: Tensor<A, 4>, mask: Tensor<A, 4>, s: AttentionShape) -> Tensor<A, 2> {
    let AttentionShape { batch: b, seq: t, heads: nh, kv_heads: nkv, head_dim: d } = s;
    let rot = cos.dims()[3];
    let heads = |y: Tensor<A, 2>, n: usize| y.reshape([b, t, n, d]).swap_dims(1, 2);
    let rope = |x: Tensor<A, 4>| {
        let x_rot = x.clone().narrow(3, 0, rot);
        let (x1, x2) = (x_rot.clone().narrow(3, 0, rot / 2), x_rot.clone().narrow(3, rot / 2, rot / 2));
        let out = x_rot * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone();
        Tensor::cat(vec![out, x.narrow(3, rot, d - rot)], 3)
    };
    let repeat = |x: Tensor<A, 4>| x.reshape([b, nkv, 1, t * d]).repeat_dim(2, nh / nkv).reshape([b, nh, t, d]);
    let (q, k, v) = (rope(heads(q, nh)), repeat(rope(heads(k, nkv))), repeat(heads(v, nkv)));
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5)) + mask;
    softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, nh * d])
}

/// Inputs of one attention call: grouped heads (6 query heads on 2 kv heads), RoPE on 6 of 8
/// dims, per-row tables and masks as packing makes them (row 0 one causal sample, row 1 two
/// samples of 3 + 4 tokens with positions restarting), and the output's cotangent.
struct AttentionCase {
    s: AttentionShape,
    qkv: [Tensor<NdArray, 2>; 3],
    rope: [Tensor<NdArray, 4>; 2],
    mask: Tensor<NdArray, 4>,
    dy: Tensor<NdArray, 2>,
}

fn attention_case() -> AttentionCase {
    let s = AttentionShape { batch: 2, seq: 7, heads: 6, kv_heads: 2, head_dim: 8 };
    let (bt, rot) = (s.batch * s.seq, 6);
    let qkv = [random([bt, s.heads * s.head_dim], 1.0), random([bt, s.kv_heads * s.head_dim], 1.0), random([bt, s.kv_heads * s.head_dim], 1.0)];
    let dy = random([bt, s.heads * s.head_dim], 1.0);
    let angle = |p: usize, j: usize| p as f32 * (1.0 + (j % (rot / 2)) as f32 * 0.3);
    let positions = [vec![0, 1, 2, 3, 4, 5, 6], vec![0, 1, 2, 0, 1, 2, 3]];
    let sample = [vec![0; 7], vec![0, 0, 0, 1, 1, 1, 1]];
    let table = |f: fn(f32) -> f32| -> Vec<f32> { positions.iter().flat_map(|row| row.iter().flat_map(move |&p| (0..rot).map(move |j| f(angle(p, j))))).collect() };
    let mut mask = vec![f32::NEG_INFINITY; 2 * 7 * 7];
    for r in 0..2 {
        for i in 0..7 {
            for j in 0..=i {
                if sample[r][i] == sample[r][j] {
                    mask[r * 49 + i * 7 + j] = 0.0;
                }
            }
        }
    }
    let four = |v: Vec<f32>, shape: [usize; 4]| Tensor::<NdArray, 4>::from_data(TensorData::new(v, shape), &Default::default());
    AttentionCase { s, qkv, rope: [four(table(f32::cos), [2, 1, 7, rot]), four(table(f32::sin), [2, 1, 7, rot])], mask: four(mask, [2, 1, 7, 7]), dy }
}

/// y, dq, dk, dv of `attend` on backend `A` under autodiff, from the case's inputs.
fn attention_grads<A: AutodiffBackend>(case: &AttentionCase, device: &A::Device, attend: &dyn Fn([Tensor<A, 2>; 3], [Tensor<A, 4>; 2], Tensor<A, 4>) -> Tensor<A, 2>) -> [Vec<f32>; 4] {
    let on = |t: &Tensor<NdArray, 2>| Tensor::<A, 2>::from_data(t.to_data(), device);
    let on4 = |t: &Tensor<NdArray, 4>| Tensor::<A, 4>::from_data(t.to_data(), device);
    let [q, k, v] = case.qkv.each_ref().map(|t| on(t).require_grad());
    let y = attend([q.clone(), k.clone(), v.clone()], case.rope.each_ref().map(on4), on4(&case.mask));
    let grads = (y.clone() * on(&case.dy)).sum().backward();
    [y.inner(), q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()].map(values)
}

fn with_tensor_ops<A: burn::tensor::backend::Backend>(case: &AttentionCase) -> impl Fn([Tensor<A, 2>; 3], [Tensor<A, 4>; 2], Tensor<A, 4>) -> Tensor<A, 2> {
    let s = case.s;
    move |[q, k, v], [cos, sin], mask| attention_with_tensor_ops(q, k, v, cos, sin, mask, s)
}

fn assert_close(what: &str, ours: &[Vec<f32>; 4], want: &[Vec<f32>; 4], tolerance: f64) {
    for ((name, o), w) in ["y", "dq", "dk", "dv"].into_iter().zip(ours).zip(want) {
        let e = rel_error(o, w);
        println!("self_attention ({what}) {name}: rel error {e:e}");
        assert!(e < tolerance, "self_attention ({what}) {name}: rel error {e:e}");
    }
}

#[test]
fn self_attention_matches_tensor_ops_with_grouped_heads_partial_rope_and_packed_masks() {
    let case = attention_case();
    let s = case.s;
    let want = attention_grads::<B>(&case, &Default::default(), &with_tensor_ops::<B>(&case));
    let fused = attention_grads::<B>(&case, &Default::default(), &|[q, k, v], rope, mask| B::self_attention(q, k, v, rope, mask, s).expect("the CPU backend has a fused attention").0);
    assert_close("CPU kernel", &fused, &want, 1e-6);
    // The tensor-op version every other backend runs, forward and backward, without autodiff.
    let [q, k, v] = case.qkv.clone();
    let (y, probs) = reference::self_attention(q.clone(), k.clone(), v.clone(), case.rope.clone(), case.mask.clone(), s);
    let [dq, dk, dv] = reference::self_attention_backward(q, k, v, case.rope.clone(), probs, case.dy.clone(), s);
    assert_close("tensor ops, one node", &[y, dq, dk, dv].map(values), &want, 1e-6);
}

/// On wgpu (lavapipe here) the attention is one autodiff node too, equal to burn's autodiff
/// of the tensor ops on the same device and to the CPU.
#[test]
fn self_attention_on_wgpu_is_one_node_equal_to_tensor_ops() {
    type W = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let case = attention_case();
    let s = case.s;
    let ours = attention_grads::<Autodiff<W>>(&case, &device, &|[q, k, v], rope, mask| <Autodiff<W> as HoneBackend>::self_attention(q, k, v, rope, mask, s).expect("every backend has an attention node").0);
    let on_gpu = attention_grads::<Autodiff<W>>(&case, &device, &with_tensor_ops::<Autodiff<W>>(&case));
    let on_cpu = attention_grads::<B>(&case, &Default::default(), &with_tensor_ops::<B>(&case));
    assert_close("wgpu node vs wgpu tensor ops", &ours, &on_gpu, 1e-5);
    assert_close("wgpu node vs CPU tensor ops", &ours, &on_cpu, 1e-5);
}

#[test]
fn adamw_matches_the_tensor_op_version_over_several_steps() {
    let shape = [16, 1031];
    let zeros = || Tensor::<NdArray, 2>::zeros(shape, &Default::default());
    let mut ours = [random(shape, 0.1), zeros(), zeros()];
    let mut want = ours.clone();
    for step in 1..=3 {
        let grad = random(shape, 1.0);
        let s = AdamWScalars { decay: 1.0 - 1e-3 * 0.01, beta1_weight: 0.1, beta2: 0.999, beta2_weight: 0.001, bias_correction2_sqrt: (1.0 - 0.999f64.powi(step)).sqrt(), eps: 1e-8, step_size: 1e-3 / (1.0 - 0.9f64.powi(step)) };
        let [p, m, v] = ours.clone();
        ours = NdArray::adamw(p, grad.clone(), m, v, s);
        let [p, m, v] = want.clone();
        want = reference::adamw(p, grad, m, v, s);
    }
    for ((what, o), w) in ["param", "exp_avg", "exp_avg_sq"].into_iter().zip(ours).zip(want) {
        let e = rel_error(&values(o), &values(w));
        println!("adamw {what}: rel error {e:e}");
        assert!(e < 1e-6, "fused adamw {what}: rel error {e:e}");
    }
}

#[test]
fn adamw_kernel_on_wgpu_equals_the_cpu() {
    type W = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let shape = [16, 1031];
    let on_gpu = |t: &Tensor<NdArray, 2>| Tensor::<W, 2>::from_data(t.to_data(), &device);
    let zeros = || Tensor::<NdArray, 2>::zeros(shape, &Default::default());
    let mut cpu = [random(shape, 0.1), zeros(), zeros()];
    let mut gpu = cpu.clone().map(|t| on_gpu(&t));
    for step in 1..=3 {
        let grad = random(shape, 1.0);
        let s = AdamWScalars { decay: 1.0 - 1e-3 * 0.01, beta1_weight: 0.1, beta2: 0.999, beta2_weight: 0.001, bias_correction2_sqrt: (1.0 - 0.999f64.powi(step)).sqrt(), eps: 1e-8, step_size: 1e-3 / (1.0 - 0.9f64.powi(step)) };
        let [p, m, v] = cpu.clone();
        cpu = NdArray::adamw(p, grad.clone(), m, v, s);
        let [p, m, v] = gpu.clone();
        gpu = W::adamw(p, on_gpu(&grad), m, v, s);
    }
    for ((what, c), g) in ["param", "exp_avg", "exp_avg_sq"].into_iter().zip(cpu).zip(gpu) {
        let e = rel_error(&values(g), &values(c));
        println!("adamw kernel {what}: rel error {e:e} against the CPU");
        assert!(e < 1e-6, "adamw kernel {what}: rel error {e:e}");
    }
}

#[test]
fn swiglu_kernels_on_wgpu_equal_the_cpu() {
    type W = burn::backend::Wgpu;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let on_gpu = |t: &Tensor<NdArray, 2>| Tensor::<W, 2>::from_data(t.to_data(), &device);
    let (g, u, d) = (random([37, 1031], 20.0), random([37, 1031], 3.0), random([37, 1031], 1.0));
    let y = W::swiglu(on_gpu(&g), on_gpu(&u));
    let (dg, du) = W::swiglu_backward(on_gpu(&g), on_gpu(&u), on_gpu(&d));
    let want_y = NdArray::swiglu(g.clone(), u.clone());
    let (want_dg, want_du) = NdArray::swiglu_backward(g, u, d);
    for (what, ours, want) in [("y", values(y), values(want_y)), ("dgate", values(dg), values(want_dg)), ("dup", values(du), values(want_du))] {
        let e = rel_error(&ours, &want);
        println!("swiglu kernel {what}: rel error {e:e} against the CPU");
        assert!(e < 1e-6, "swiglu kernel {what}: rel error {e:e}");
    }
}
