//! hone's matmul kernel for software GPUs (shaders/src/matmul.rs) on wgpu (lavapipe here)
//! against the CPU's matmul: strided and transposed operands, sizes off its 4×4 tile, batched
//! and broadcast batch dimensions; and its autodiff node's gradients against burn's autodiff.
//! End to end, lora_grads.rs checks PEFT's loss and gradients with it.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{Distribution, Tensor};
use hone::ops::HoneBackend;
use hone::parity::rel_error;

fn values<const D: usize>(t: Tensor<impl burn::tensor::backend::Backend, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn random<const D: usize>(shape: [usize; D]) -> Tensor<NdArray, D> {
    Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &Default::default())
}

fn on_gpu<const D: usize>(t: &Tensor<NdArray, D>) -> Tensor<Wgpu, D> {
    Tensor::from_data(t.to_data(), &Default::default())
}

fn check<const D: usize>(what: &str, a: Tensor<NdArray, D>, b: Tensor<NdArray, D>, gpu_view: impl Fn(Tensor<Wgpu, D>, Tensor<Wgpu, D>) -> (Tensor<Wgpu, D>, Tensor<Wgpu, D>)) {
    let want = a.clone().matmul(b.clone());
    let (ga, gb) = gpu_view(on_gpu(&a), on_gpu(&b));
    let ours = Wgpu::matmul(ga, gb);
    assert_eq!(ours.dims(), want.dims(), "{what}: shape");
    let e = rel_error(&values(ours), &values(want));
    println!("{what}: rel error {e:e} against the CPU");
    assert!(e < 1e-6, "{what}: rel error {e:e}");
}

#[test]
fn kernel_equals_the_cpu_on_strided_batched_and_ragged_shapes() {
    hone::ops::use_register_matmul(true);
    // Contiguous, sizes that leave partial tiles on every side.
    check("7x5 · 5x9", random([7, 5]), random([5, 9]), |a, b| (a, b));
    // Both operands transposed views (what x·Wᵀ and the backward's Aᵀ·dy read).
    let (at, bt) = (random([5, 7]), random([9, 5]));
    check("transposed views", at.clone().transpose(), bt.clone().transpose(), |_, _| (on_gpu(&at).transpose(), on_gpu(&bt).transpose()));
    // A column slice (a narrowed projection) as the left operand.
    let wide = random([6, 20]);
    check("narrowed lhs", wide.clone().narrow(1, 4, 11), random([11, 3]).clone(), |_, b| (on_gpu(&wide).narrow(1, 4, 11), b));
    // Batched (attention's scores and output), k longer than one tile, and a broadcast batch.
    check("rank 3", random([3, 6, 37]), random([3, 37, 11]), |a, b| (a, b));
    let (q, k) = (random([2, 3, 13, 8]), random([2, 3, 13, 8]));
    check("q·kᵀ rank 4", q.clone(), k.clone().swap_dims(2, 3), |_, _| (on_gpu(&q), on_gpu(&k).swap_dims(2, 3)));
    check("broadcast batch", random([2, 1, 5, 8]), random([1, 3, 8, 6]), |a, b| (a, b));
    // SmolLM2's shapes: hidden 576 by intermediate 1536, 40 tokens.
    check("40x576 · 576x1536", random([40, 576]), random([576, 1536]), |a, b| (a, b));
}

#[test]
fn autodiff_node_gradients_equal_burns_autodiff() {
    hone::ops::use_register_matmul(true);
    type G = Autodiff<Wgpu>;
    type C = Autodiff<NdArray>;
    let (a, b, w) = (random([2, 3, 7, 5]), random([2, 3, 9, 5]), random([2, 3, 7, 9]));
    let want = {
        let (ta, tb) = (Tensor::<C, 4>::from_inner(a.clone()).require_grad(), Tensor::<C, 4>::from_inner(b.clone()).require_grad());
        let y = ta.clone().matmul(tb.clone().swap_dims(2, 3));
        let grads = (y.clone() * Tensor::from_inner(w.clone())).sum().backward();
        [values(y), values(ta.grad(&grads).unwrap()), values(tb.grad(&grads).unwrap())]
    };
    let ours = {
        let (ta, tb) = (Tensor::<G, 4>::from_inner(on_gpu(&a)).require_grad(), Tensor::<G, 4>::from_inner(on_gpu(&b)).require_grad());
        let y = G::matmul(ta.clone(), tb.clone().swap_dims(2, 3));
        let grads = (y.clone() * Tensor::from_inner(on_gpu(&w))).sum().backward();
        [values(y), values(ta.grad(&grads).unwrap()), values(tb.grad(&grads).unwrap())]
    };
    for ((what, o), t) in ["y", "da", "db"].into_iter().zip(&ours).zip(&want) {
        let e = rel_error(o, t);
        println!("autodiff matmul {what}: rel error {e:e}");
        assert!(e < 1e-6, "autodiff matmul {what}: rel error {e:e}");
    }
}

/// Not a test: times hone's kernel against burn's on wgpu's default adapter for the shapes of
/// the bench's fixture and of SmolLM2 (`x·Wᵀ` with W stored `[out, in]`, and the backward's
/// `dy·W`). Point `VK_ICD_FILENAMES` at Chromium's SwiftShader driver to time that one:
/// `cargo test --release -p hone --test matmul_wgpu -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_against_burns_kernel() {
    let device = Default::default();
    let shapes = [(48, 64, 64), (48, 64, 384), (64, 576, 576), (64, 576, 1536), (64, 1536, 576), (256, 576, 1536), (64, 576, 49152)];
    for (m, k, n) in shapes {
        let x = Tensor::<Wgpu, 2>::random([m, k], Distribution::Uniform(-1.0, 1.0), &device);
        let w = Tensor::<Wgpu, 2>::random([n, k], Distribution::Uniform(-1.0, 1.0), &device);
        let dy = Tensor::<Wgpu, 2>::random([m, n], Distribution::Uniform(-1.0, 1.0), &device);
        let mut line = format!("m {m:4} k {k:5} n {n:6}:");
        for hone_kernel in [false, true] {
            hone::ops::use_register_matmul(hone_kernel);
            let run = |f: &dyn Fn() -> Tensor<Wgpu, 2>| {
                let _ = f().into_data();
                let t = std::time::Instant::now();
                let reps = 3;
                for _ in 0..reps {
                    let _ = f().into_data();
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let fwd = run(&|| Wgpu::matmul(x.clone(), w.clone().transpose()));
            let bwd = run(&|| Wgpu::matmul(dy.clone(), w.clone()));
            let gflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
            line += &format!("  {}: x·Wᵀ {:7.2} ms ({:5.1} GFLOP/s), dy·W {:7.2} ms ({:5.1})", if hone_kernel { "hone" } else { "burn" }, fwd * 1e3, gflops(fwd), bwd * 1e3, gflops(bwd));
        }
        println!("{line}");
    }
}
