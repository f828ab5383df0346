//! NF4 quantization equals bitsandbytes bit for bit (fixtures from
//! tests/reference/make_nf4_fixtures.py): packed bytes, absmax, double-quantized absmax,
//! offset, and dequantized values.

mod common;

use hone::io::safetensors::{Dtype, SafeTensors};
use hone::io::FileSource;
use hone::quant::dynamic_map::signed_dynamic_map;
use hone::quant::nf4::{Absmax, Nf4Tensor, NF4_CODE};

const CASES: [&str; 6] = ["square", "ragged", "wide", "small_block", "many_blocks", "zeros"];

fn fixture() -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(&common::fixtures().join("nf4/nf4.safetensors")).unwrap())).unwrap()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.read_f32(name).unwrap().1
}

fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
    let (info, bytes) = st.read_raw(name).unwrap();
    assert_eq!(info.dtype, Dtype::U8, "{name}");
    bytes
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Equal bit for bit; on failure, says where and how many differ instead of dumping arrays.
fn same<T: PartialEq + std::fmt::Debug>(ours: &[T], theirs: &[T], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let diffs: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    if let Some(&i) = diffs.first() {
        panic!("{what}: {} of {} differ; first at {i}: ours {:?}, bitsandbytes {:?}", diffs.len(), ours.len(), ours[i], theirs[i]);
    }
}

fn blocksize(st: &SafeTensors, case: &str) -> usize {
    let (_, b) = st.read_raw(&format!("{case}.blocksize")).unwrap();
    i64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

#[test]
fn code_tables_match_bitsandbytes() {
    let st = fixture();
    assert_eq!(bits(&NF4_CODE), bits(&f32s(&st, "nf4_code")));
    same(&bits(&signed_dynamic_map()), &bits(&f32s(&st, "nested_code")), "dynamic map");
}

#[test]
fn nf4_matches_bitsandbytes_bit_for_bit() {
    let st = fixture();
    for case in CASES {
        let (shape, w) = st.read_f32(&format!("{case}.weight")).unwrap();
        let bs = blocksize(&st, case);
        let q = Nf4Tensor::quantize(&w, &shape, bs, false).unwrap();
        same(&q.packed, &u8s(&st, &format!("{case}.packed")), &format!("{case}: packed bytes"));
        match &q.absmax {
            Absmax::Plain(a) => same(&bits(a), &bits(&f32s(&st, &format!("{case}.absmax"))), &format!("{case}: absmax")),
            _ => unreachable!(),
        }
        same(&bits(&q.dequantize()), &bits(&f32s(&st, &format!("{case}.dequantized"))), &format!("{case}: dequantized"));
    }
}

#[test]
fn double_quant_matches_bitsandbytes_bit_for_bit() {
    let st = fixture();
    for case in CASES {
        let (shape, w) = st.read_f32(&format!("{case}.weight")).unwrap();
        let bs = blocksize(&st, case);
        let q = Nf4Tensor::quantize(&w, &shape, bs, true).unwrap();
        same(&q.packed, &u8s(&st, &format!("{case}.packed")), &format!("{case}: packed bytes"));
        let Absmax::Nested(n) = &q.absmax else { unreachable!() };
        assert_eq!(n.offset.to_bits(), f32s(&st, &format!("{case}.dq.offset"))[0].to_bits(), "{case}: offset");
        same(&n.codes, &u8s(&st, &format!("{case}.dq.absmax")), &format!("{case}: absmax codes"));
        same(&bits(&n.nested_absmax), &bits(&f32s(&st, &format!("{case}.dq.nested_absmax"))), &format!("{case}: nested absmax"));
        same(&bits(&q.dequantize()), &bits(&f32s(&st, &format!("{case}.dq.dequantized"))), &format!("{case}: dequantized"));
    }
}

#[test]
fn bad_blocksizes_are_refused() {
    for bs in [0, 16, 48, 100, 8192] {
        assert!(Nf4Tensor::quantize(&[0.0; 64], &[64], bs, false).is_err(), "block size {bs}");
    }
}

/// The device dequantization equals bitsandbytes' values bit for bit: the backend's own
/// (`nf4_dequantize`: the CubeCL kernel in shaders/ on wgpu, tensor ops on ndarray) and the
/// portable tensor-op version.
fn device_dequant_matches<B: hone::ops::HoneBackend>(device: &B::Device) {
    let st = fixture();
    for case in CASES {
        let (shape, w) = st.read_f32(&format!("{case}.weight")).unwrap();
        let bs = blocksize(&st, case);
        for (dq, key) in [(false, format!("{case}.dequantized")), (true, format!("{case}.dq.dequantized"))] {
            let q = Nf4Tensor::quantize(&w, &shape, bs, dq).unwrap();
            let w = hone::quant::Nf4Weight::<B>::from_host(&q, device);
            for (path, on_device) in [("backend", B::nf4_dequantize(&w)), ("tensor ops", w.dequantize())] {
                assert_eq!(on_device.dims().to_vec(), shape);
                let ours = on_device.into_data().to_vec::<f32>().unwrap();
                same(&bits(&ours), &bits(&f32s(&st, &key)), &format!("{case} (double quant {dq}): {path} dequantized"));
            }
        }
    }
}

#[test]
fn device_dequant_matches_bitsandbytes_on_ndarray() {
    device_dequant_matches::<burn::backend::NdArray>(&Default::default());
}

#[test]
fn device_dequant_matches_bitsandbytes_on_wgpu() {
    device_dequant_matches::<burn::backend::Wgpu>(&Default::default());
}

/// Quantizing in pieces (as loading streams a tensor) gives the whole-tensor result, and the
/// error it reports equals the error of the dequantized weight.
#[test]
fn streamed_quantization_equals_whole_tensor() {
    let st = fixture();
    for case in CASES {
        let x = f32s(&st, &format!("{case}.weight"));
        let shape = st.info(&format!("{case}.weight")).unwrap().shape.clone();
        for blocksize in [64, 128] {
            let whole = Nf4Tensor::quantize(&x, &shape, blocksize, true).unwrap();
            let mut b = hone::quant::nf4::Nf4Builder::new(&shape, blocksize, true).unwrap();
            for piece in x.chunks(blocksize * 3) {
                b.push(piece).unwrap();
            }
            let (streamed, (diff, norm)) = b.finish().unwrap();
            assert_eq!(streamed, whole, "{case} blocksize {blocksize}");
            let direct: f64 = whole.dequantize().iter().zip(&x).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let ssq: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
            assert!((diff - direct).abs() <= 1e-6 * ssq.max(1e-30), "{case}: error {diff} vs {direct}");
            assert!((norm - ssq).abs() <= 1e-9 * ssq.max(1e-30));
        }
        // A piece that is not whole blocks (before the end) is refused.
        let mut b = hone::quant::nf4::Nf4Builder::new(&shape, 64, true).unwrap();
        if x.len() > 100 {
            assert!(b.push(&x[..33]).is_err());
        }
    }
}

/// The frozen NF4 products, `x·Wᵀ` and `dy·W` (fused on wgpu: the weight decoded inside the
/// kernel; AVX-512 kernels or dequantize + GEMM on the CPU), equal f64 products of
/// bitsandbytes' dequantized weight, for batch sizes on and off the kernels' 4-row tiles.
fn frozen_products_match<B: hone::ops::HoneBackend>(device: &B::Device) {
    use burn::tensor::{Tensor, TensorData};
    let st = fixture();
    for case in CASES {
        let (shape, w) = st.read_f32(&format!("{case}.weight")).unwrap();
        let [n, k] = [shape[0], shape[1]];
        let bs = blocksize(&st, case);
        for dq in [false, true] {
            let deq = f32s(&st, &if dq { format!("{case}.dq.dequantized") } else { format!("{case}.dequantized") });
            let q = Nf4Tensor::quantize(&w, &shape, bs, dq).unwrap();
            let weight = hone::quant::FrozenWeight::nf4(hone::quant::Nf4Weight::<B>::from_host(&q, device));
            for m in [1, 5, 12] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
                let dy: Vec<f32> = (0..m * n).map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0).collect();
                let want_y: Vec<f32> = (0..m * n).map(|e| (0..k).map(|p| x[e / n * k + p] as f64 * deq[e % n * k + p] as f64).sum::<f64>() as f32).collect();
                let want_dx: Vec<f32> = (0..m * k).map(|e| (0..n).map(|p| dy[e / k * n + p] as f64 * deq[p * k + e % k] as f64).sum::<f64>() as f32).collect();
                let y = B::frozen_matmul(Tensor::from_data(TensorData::new(x, [m, k]), device), &weight).into_data().to_vec::<f32>().unwrap();
                let dx = B::frozen_matmul_backward(Tensor::from_data(TensorData::new(dy, [m, n]), device), &weight).into_data().to_vec::<f32>().unwrap();
                for (what, ours, want) in [("x·Wᵀ", &y, &want_y), ("dy·W", &dx, &want_dx)] {
                    let e = hone::parity::rel_error(ours, want);
                    assert!(e < 1e-5, "{case} [{n}, {k}] (double quant {dq}), {m} rows: {what} rel error {e:e}");
                }
            }
        }
    }
}

#[test]
fn frozen_nf4_products_on_ndarray() {
    frozen_products_match::<burn::backend::NdArray>(&Default::default());
}

#[test]
fn frozen_nf4_products_on_wgpu() {
    frozen_products_match::<burn::backend::Wgpu>(&Default::default());
}
