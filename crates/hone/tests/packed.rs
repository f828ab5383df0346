//! Frozen tables in the checkpoint's precision (f32, bf16, f16 bits in i32 words, split into
//! parts where one buffer would be too big): every op on them — the product `x·Wᵀ`, its
//! backward `dy·W`, the row lookup, the whole-weight unpack — equals the same op on the f32
//! values the bits stand for, on the CPU and on wgpu (lavapipe), whole, split into parts, and
//! (wgpu) kept in host memory.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use hone::ops::HoneBackend;
use hone::parity::rel_error;
use hone::quant::frozen::{PackedWeight, StoredFloat};
use hone::quant::FrozenWeight;

/// Deterministic values in ±1 with some of every kind of f16 value among them.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The words of `v` stored as `format` and the f32 values those bits stand for.
fn stored(v: &[f32], format: StoredFloat) -> (Vec<i32>, Vec<f32>) {
    match format {
        StoredFloat::F32 => (v.iter().map(|x| x.to_bits() as i32).collect(), v.to_vec()),
        StoredFloat::BF16 | StoredFloat::F16 => {
            let bits: Vec<u16> = v
                .iter()
                .map(|&x| if format == StoredFloat::BF16 { half::bf16::from_f32(x).to_bits() } else { half::f16::from_f32(x).to_bits() })
                .collect();
            let words = bits.chunks(2).map(|p| (p[0] as u32 | (p[1] as u32) << 16) as i32).collect();
            let back = bits.iter().map(|&b| format.decode(b as u32)).collect();
            (words, back)
        }
    }
}

fn host<B: HoneBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn check<B: HoneBackend>(device: &B::Device, label: &str) {
    let (rows, cols, m) = (37, 48, 6);
    let raw = values(rows * cols, 7);
    for format in [StoredFloat::F32, StoredFloat::BF16, StoredFloat::F16] {
        let (words, want) = stored(&raw, format);
        let dense = FrozenWeight::<B>::dense(Tensor::from_data(TensorData::new(want.clone(), [rows, cols]), device));
        // Whole, then in parts of 5 rows (the last of 2), then (GPU backends) in host memory.
        let mut layouts: Vec<(String, PackedWeight<B>)> = [u64::MAX, 5 * 4 * (cols / format.per_word()) as u64]
            .into_iter()
            .map(|part_bytes| {
                let p = PackedWeight::<B>::from_words(words.clone(), rows, cols, format, part_bytes, device).unwrap();
                (format!("{label} {format:?} in {} part(s)", p.parts.len()), p)
            })
            .collect();
        if B::tables_on_host() {
            layouts.push((format!("{label} {format:?} in host memory"), PackedWeight::<B>::on_host(words.clone(), rows, cols, format, device).unwrap()));
        }
        for (what, packed) in layouts {
            let packed = FrozenWeight::packed(packed);
            assert_eq!(host(packed.to_dense()), want, "{what}: unpacked values");
            for m in [2, m] {
                let x = Tensor::<B, 2>::from_data(TensorData::new(values(m * cols, 11), [m, cols]), device);
                let e = rel_error(&host(B::frozen_matmul(x.clone(), &packed)), &host(B::frozen_matmul(x, &dense)));
                assert!(e < 1e-6, "{what}, {m} rows: x·Wᵀ rel error {e:e}");
            }
            let dy = Tensor::<B, 2>::from_data(TensorData::new(values(m * rows, 13), [m, rows]), device);
            let e = rel_error(&host(B::frozen_matmul_backward(dy.clone(), &packed)), &host(B::frozen_matmul_backward(dy, &dense)));
            assert!(e < 1e-6, "{what}: dy·W rel error {e:e}");
            let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i64, 36, 5, 4, 17, 5], [6]), device);
            let got = host(B::frozen_rows(&packed, ids));
            let expect: Vec<f32> = [0usize, 36, 5, 4, 17, 5].iter().flat_map(|&r| want[r * cols..(r + 1) * cols].to_vec()).collect();
            assert_eq!(got, expect, "{what}: rows");
        }
    }
}

#[test]
fn packed_tables_equal_their_f32_values_on_the_cpu() {
    check::<NdArray>(&Default::default(), "cpu");
    check::<Autodiff<NdArray>>(&Default::default(), "cpu autodiff");
}

#[test]
fn packed_tables_equal_their_f32_values_on_wgpu() {
    assert!(<Wgpu as HoneBackend>::tables_on_host(), "native wgpu keeps untied embeddings in host memory");
    check::<Wgpu>(&WgpuDevice::default(), "wgpu");
    // In host memory the table takes one word of device memory.
    let table = PackedWeight::<Wgpu>::on_host(vec![0; 64], 8, 16, StoredFloat::BF16, &WgpuDevice::default()).unwrap();
    assert_eq!((table.bytes(), table.host_bytes()), (4, 256));
}

/// f16's edge cases decoded by the GPU kernel as the `half` crate decodes them: zeros, the
/// smallest and largest subnormals and normals, infinities, NaN.
#[test]
fn f16_bits_unpack_exactly_on_wgpu() {
    let device = WgpuDevice::default();
    let bits: Vec<u16> = vec![0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x3c00, 0xc000, 0x3555, 0x1234];
    let words: Vec<i32> = bits.chunks(2).map(|p| (p[0] as u32 | (p[1] as u32) << 16) as i32).collect();
    let n = words.len();
    let got = host::<Wgpu, 1>(Wgpu::unpack_words(Tensor::from_data(TensorData::new(words, [n]), (&device, burn::tensor::DType::I32)), StoredFloat::F16));
    let want: Vec<f32> = bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
    assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    let nan = host::<Wgpu, 1>(Wgpu::unpack_words(Tensor::from_data(TensorData::new(vec![0x7e00i32], [1]), (&device, burn::tensor::DType::I32)), StoredFloat::F16));
    assert!(nan[0].is_nan() && nan[1] == 0.0);
}
