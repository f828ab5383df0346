//! The fused ops (SwiGLU, RMSNorm, cross-entropy) against the same maths differentiated by burn's
//! autodiff: the CPU versions, and the tensor-op versions the GPU backends run, forward and
//! backward. (End to end they are also checked against PyTorch: lora_grads, train_parity.)

use burn::backend::{Autodiff, NdArray};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use hone::ops::{reference, FusedOps};
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
