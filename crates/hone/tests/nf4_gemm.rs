//! The CPU's fused NF4 products (W decoded into the kernel's tiles; AVX2, AVX-512, NEON) against
//! the plain way: dequantize W whole (bit-exact with bitsandbytes, tests/nf4.rs), then burn's
//! matmul. Every level this machine runs is tested directly; the whole CPU backend runs at the
//! level `HONE_CPU_LEVEL` names (CI runs the training parity tests once per level). Shapes cover
//! partial tiles on every side and a width the fused path declines.

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor, TensorData};
use hone::parity::rel_error;
use hone::quant::nf4::Nf4Tensor;
use hone::ops::nf4_gemm::{matmul_at, matmul_t_at, supported, supported_at, Absmax, Codes, Words};
use hone::ops::simd::CpuLevel;
use hone::quant::dynamic_map::dynamic_map_table;
use hone::quant::nf4::{Absmax as HostAbsmax, NESTED_BLOCKSIZE};
use hone::ops::HoneBackend;
use hone::quant::{FrozenWeight, Nf4Weight};

fn values(t: Tensor<NdArray, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn nf4_host(n: usize, k: usize, blocksize: usize, double_quant: bool) -> Nf4Tensor {
    let w: Vec<f32> = Tensor::<NdArray, 1>::random([n * k], Distribution::Normal(0.0, 0.05), &Default::default()).into_data().to_vec().unwrap();
    Nf4Tensor::quantize(&w, &[n, k], blocksize, double_quant).unwrap()
}

fn nf4_weight(n: usize, k: usize, blocksize: usize) -> FrozenWeight<NdArray> {
    FrozenWeight::nf4(Nf4Weight::from_host(&nf4_host(n, k, blocksize, true), &Default::default()))
}

/// The kernels' view of a host NF4 tensor, laid out as the backends store it (i32 words of
/// codes; absmax plain or as 8-bit codes 4 per word, the scales then the offset).
fn with_codes<R>(q: &Nf4Tensor, f: impl FnOnce(&Codes) -> R) -> R {
    let words: Vec<i32> = q.packed.chunks(4).map(|b| i32::from_le_bytes(std::array::from_fn(|i| b.get(i).copied().unwrap_or(0)))).collect();
    match &q.absmax {
        HostAbsmax::Plain(a) => f(&Codes { words: Words::I32(&words), absmax: Absmax::Plain(a), blocksize: q.blocksize }),
        HostAbsmax::Nested(n) => {
            let codes: Vec<i32> = n.codes.chunks(4).map(|b| i32::from_le_bytes(std::array::from_fn(|i| b.get(i).copied().unwrap_or(0)))).collect();
            let mut scales = n.nested_absmax.clone();
            scales.push(n.offset);
            assert!(n.codes.len() <= scales.len() * NESTED_BLOCKSIZE);
            f(&Codes { words: Words::I32(&words), absmax: Absmax::Nested { codes: &codes, scales: &scales, table: dynamic_map_table() }, blocksize: q.blocksize })
        }
    }
}

fn matmul_f64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, b_transposed: bool) -> Vec<f32> {
    (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k).map(|p| a[r * k + p] as f64 * if b_transposed { b[c * k + p] } else { b[p * n + c] } as f64).sum::<f64>() as f32
        })
        .collect()
}

/// Each kernel level on its own: forward and backward against f64 products of the dequantized
/// weight (plain and double-quantized absmax), partial tiles on every side.
#[test]
fn every_cpu_level_equals_the_dequantized_product() {
    let levels = CpuLevel::available();
    println!("levels here: {:?}; current {:?}", levels, CpuLevel::current());
    let mut tested = 0;
    for &level in &levels {
        for (m, n, k, blocksize, dq) in [(5, 12, 32, 64, true), (31, 13, 64, 64, false), (33, 50, 96, 32, true), (77, 7, 576, 64, true), (13, 29, 1536, 64, false)] {
            if !supported_at(level, k, blocksize) {
                continue;
            }
            let q = nf4_host(n, k, blocksize, dq);
            let dense = q.dequantize();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let dy: Vec<f32> = (0..m * n).map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0).collect();
            let (y, dx) = with_codes(&q, |codes| (matmul_t_at(level, &x, m, codes, n, k), matmul_at(level, &dy, m, codes, n, k)));
            let (ey, edx) = (rel_error(&y, &matmul_f64(&x, &dense, m, k, n, true)), rel_error(&dx, &matmul_f64(&dy, &dense, m, n, k, false)));
            println!("{} m={m} n={n} k={k} block={blocksize} double={dq}: y {ey:e}, dx {edx:e}", level.name());
            assert!(ey < 1e-6 && edx < 1e-6, "{} m={m} n={n} k={k}: y {ey:e}, dx {edx:e}", level.name());
            tested += 1;
        }
    }
    let with_kernels = levels.iter().filter(|&&l| l != CpuLevel::Scalar).count();
    assert!(tested >= 4 * with_kernels, "{tested} cases for {with_kernels} kernel levels");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(levels.contains(&CpuLevel::Avx2));
    }
    #[cfg(target_arch = "aarch64")]
    assert!(levels.contains(&CpuLevel::Neon), "NEON is detected on aarch64");
}

/// A unit vector in x picks one column of W: every level's decoder gives the dequantized values
/// bit for bit, with either absmax form.
#[test]
fn every_cpu_level_decodes_the_exact_dequantized_values() {
    let (n, k) = (24, 128);
    for dq in [false, true] {
        let q = nf4_host(n, k, 64, dq);
        let dense = q.dequantize();
        let cols = [0usize, 1, 15, 16, 31, 32, 63, 127];
        let mut x = vec![0f32; cols.len() * k];
        for (r, col) in cols.into_iter().enumerate() {
            x[r * k + col] = 1.0;
        }
        for level in CpuLevel::available().into_iter().filter(|&l| supported_at(l, k, 64)) {
            let y = with_codes(&q, |codes| matmul_t_at(level, &x, cols.len(), codes, n, k));
            for (r, col) in cols.into_iter().enumerate() {
                for j in 0..n {
                    assert_eq!(y[r * n + j].to_bits(), dense[j * k + col].to_bits(), "{}: row {j}, column {col}, double quant {dq}", level.name());
                }
            }
        }
    }
}

/// The levels whose kernels are fused multiply-adds in the same order give the same bits.
#[test]
fn kernel_levels_agree_bit_for_bit() {
    let (m, n, k) = (40, 30, 576);
    let q = nf4_host(n, k, 64, true);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 211) as f32 / 105.0) - 1.0).collect();
    let dy: Vec<f32> = (0..m * n).map(|i| ((i * 17 % 101) as f32 / 50.0) - 1.0).collect();
    let results: Vec<(CpuLevel, Vec<f32>, Vec<f32>)> = CpuLevel::available()
        .into_iter()
        .filter(|&l| supported_at(l, k, 64))
        .map(|l| with_codes(&q, |c| (l, matmul_t_at(l, &x, m, c, n, k), matmul_at(l, &dy, m, c, n, k))))
        .collect();
    for pair in results.windows(2) {
        assert!(pair[0].1 == pair[1].1 && pair[0].2 == pair[1].2, "{:?} and {:?} differ", pair[0].0, pair[1].0);
    }
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
    if CpuLevel::current() != CpuLevel::Scalar {
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

/// Not a test: the kernels' speed on SmolLM2's shapes, for tuning (at `HONE_CPU_LEVEL`).
/// `cargo test --release -p hone --test nf4_gemm -- --ignored --nocapture`
#[test]
#[ignore]
fn speed_on_smollm2_shapes() {
    // Rows: a training micro-batch's tokens (HONE_SPEED_ROWS, default 120).
    let m = std::env::var("HONE_SPEED_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
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
        println!("{} m={m} n={n} k={k}: forward {:.1} GFLOP/s, backward {:.1} GFLOP/s", CpuLevel::current().name(), flops / fwd / 1e9, flops / bwd / 1e9);
    }
}

/// The generation GEMV's dot product at every level this CPU runs, against an f64 sum, at
/// lengths with and without a remainder past the vector loop.
#[test]
fn dot_products_agree_at_every_level() {
    use hone::ops::simd::{dot_at, CpuLevel};
    for len in [0usize, 1, 7, 31, 64, 65, 576, 1536 + 13] {
        let a: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let b: Vec<f32> = (0..len).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let scale: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum::<f64>().max(1e-30);
        for level in CpuLevel::available() {
            let got = dot_at(level, &a, &b) as f64;
            assert!((got - exact).abs() / scale < 1e-6, "{} at length {len}: {got} vs {exact}", level.name());
        }
    }
}
