//! The fused frozen-plus-low-rank op (`x·Wᵀ + s·x·Aᵀ·Bᵀ`, one autodiff node) against the same
//! sum written as separate burn ops differentiated by burn, on dense and NF4 weights, for a
//! training-sized x and a generation-sized one. (End to end: lora_grads and train_parity check
//! it against PEFT.)

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Tensor};
use hone::parity::rel_error;
use hone::quant::nf4::Nf4Tensor;
use hone::ops::HoneBackend;
use hone::quant::{FrozenWeight, Nf4Weight};

type B = Autodiff<NdArray>;

fn values(t: Tensor<NdArray, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn random(shape: [usize; 2], std: f64) -> Tensor<NdArray, 2> {
    Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
}

#[test]
fn fused_lowrank_equals_separate_ops_forward_and_backward() {
    let (n, k, r, s) = (96, 64, 8, 2.0);
    let dense = random([n, k], 0.05);
    let q = Nf4Tensor::quantize(&values(dense.clone()), &[n, k], 64, true).unwrap();
    for m in [3, 45] {
        for nf4 in [false, true] {
            let weight = || if nf4 { FrozenWeight::<B>::nf4(Nf4Weight::from_host(&q, &Default::default())) } else { FrozenWeight::dense(Tensor::from_inner(dense.clone())) };
            let (x0, a0, b0, w0) = (random([m, k], 1.0), random([r, k], 0.1), random([n, r], 0.1), random([m, n], 1.0));
            let run = |fused: bool| {
                let w = weight();
                let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
                let a = Tensor::<B, 2>::from_inner(a0.clone()).require_grad();
                let b = Tensor::<B, 2>::from_inner(b0.clone()).require_grad();
                let y = if fused {
                    B::frozen_matmul_lowrank(x.clone(), &w, a.clone(), b.clone(), s)
                } else {
                    x.clone().matmul(w.to_dense().transpose()) + x.clone().matmul(a.clone().transpose()).matmul(b.clone().transpose()).mul_scalar(s)
                };
                let grads = (y.clone() * Tensor::from_inner(w0.clone())).sum().backward();
                [y.inner(), x.grad(&grads).unwrap(), a.grad(&grads).unwrap(), b.grad(&grads).unwrap()].map(values)
            };
            let (ours, want) = (run(true), run(false));
            for (what, o, w) in ["y", "dx", "dA", "dB"].into_iter().zip(&ours).zip(&want).map(|((n, o), w)| (n, o, w)) {
                let e = rel_error(o, w);
                println!("m={m} nf4={nf4} {what}: rel error {e:e}");
                assert!(e < 1e-6, "m={m} nf4={nf4} {what}: rel error {e:e}");
            }
        }
    }
}
