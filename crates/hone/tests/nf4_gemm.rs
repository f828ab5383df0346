//! The CPU's fused NF4 products (AVX-512: W decoded into the kernel's tiles) against the plain
//! way: dequantize W whole (bit-exact with bitsandbytes, tests/nf4.rs), then burn's matmul.
//! Shapes cover partial tiles on every side and a width the fused path declines.

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor, TensorData};
use hone::parity::rel_error;
use hone::quant::nf4::Nf4Tensor;
use hone::ops::nf4_gemm::supported;
use hone::ops::HoneBackend;
use hone::quant::{FrozenWeight, Nf4Weight};

fn values(t: Tensor<NdArray, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn nf4_weight(n: usize, k: usize, blocksize: usize) -> FrozenWeight<NdArray> {
    let w: Vec<f32> = Tensor::<NdArray, 1>::random([n * k], Distribution::Normal(0.0, 0.05), &Default::default()).into_data().to_vec().unwrap();
    let q = Nf4Tensor::quantize(&w, &[n, k], blocksize, true).unwrap();
    FrozenWeight::nf4(Nf4Weight::from_host(&q, &Default::default()))
}

#[test]
fn fused_nf4_products_equal_dequantize_then_matmul() {
    let device = Default::default();
    // (rows of x, out features, in features, blocksize)
    let cases = [(5, 12, 32, 64), (31, 13, 64, 64), (33, 50, 96, 32), (77, 7, 576, 64), (120, 192, 576, 64), (64, 576, 1536, 64), (9, 24, 40, 64)];
    let mut fused = 0;
    for (m, n, k, blocksize) in cases {
        let w = nf4_weight(n, k, blocksize);
        fused += supported(k, blocksize) as usize;
        let x = Tensor::<NdArray, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<NdArray, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        let dense = w.to_dense();
        let want_y = values(x.clone().matmul(dense.clone().transpose()));
        let want_dx = values(dy.clone().matmul(dense));
        let (ey, edx) = (rel_error(&values(NdArray::frozen_matmul(x, &w)), &want_y), rel_error(&values(NdArray::frozen_matmul_backward(dy, &w)), &want_dx));
        println!("m={m} n={n} k={k} block={blocksize} fused={}: y rel error {ey:e}, dx rel error {edx:e}", supported(k, blocksize));
        assert!(ey < 1e-6 && edx < 1e-6, "m={m} n={n} k={k}: y {ey:e}, dx {edx:e}");
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(fused, cases.len() - 1, "every case but the 40-wide one takes the fused path here");
    }
}

#[test]
fn fused_products_use_the_exact_dequantized_values() {
    // One row of x that is a unit vector picks one column of W exactly: the kernel's decoded
    // values must be the dequantized ones bit for bit, not merely close.
    let (n, k) = (24, 128);
    let w = nf4_weight(n, k, 64);
    let dense = values(w.to_dense());
    let mut x = vec![0f32; 6 * k];
    for (r, col) in [0usize, 1, 31, 32, 63, 127].into_iter().enumerate() {
        x[r * k + col] = 1.0;
    }
    let y = values(NdArray::frozen_matmul(Tensor::from_data(TensorData::new(x.clone(), [6, k]), &Default::default()), &w));
    for (r, col) in [0usize, 1, 31, 32, 63, 127].into_iter().enumerate() {
        for j in 0..n {
            assert_eq!(y[r * n + j].to_bits(), dense[j * k + col].to_bits(), "row {j}, column {col}");
        }
    }
}

/// Not a test: the kernels' speed on SmolLM2's shapes, for tuning.
/// `cargo test --release -p hone --test nf4_gemm -- --ignored --nocapture`
#[test]
#[ignore]
fn speed_on_smollm2_shapes() {
    let m = 120;
    for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = nf4_weight(n, k, 64);
        let x = Tensor::<NdArray, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &Default::default());
        let dy = Tensor::<NdArray, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &Default::default());
        let reps = 50;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(NdArray::frozen_matmul(x.clone(), &w));
        }
        let fwd = t.elapsed().as_secs_f64() / reps as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(NdArray::frozen_matmul_backward(dy.clone(), &w));
        }
        let bwd = t.elapsed().as_secs_f64() / reps as f64;
        let flops = 2.0 * (m * n * k) as f64;
        println!("m={m} n={n} k={k}: forward {:.1} GFLOP/s, backward {:.1} GFLOP/s", flops / fwd / 1e9, flops / bwd / 1e9);
    }
}
