//! Host-side pieces of the CPU backend's ops: f32 views of NdArray tensors, a vectorizable
//! exponential (libm's `expf` is one call per value), the strided GEMM, and the row loops of
//! attention (RoPE per head, masked softmax).

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

/// Values per parallel task in elementwise loops: large enough that scheduling is noise.
pub(crate) const CHUNK: usize = 1 << 14;

/// Runs `f` on the f32 values of a float NdArray tensor in row-major order, borrowed in place
/// when contiguous (a weight is never copied).
pub(crate) fn with_f32<R, const D: usize>(t: Tensor<NdArray, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    match t.into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(s)) => {
            let v = s.view();
            match v.as_slice() {
                Some(slice) => f(slice),
                None => f(&v.iter().copied().collect::<Vec<f32>>()),
            }
        }
        _ => panic!("hone computes in f32"),
    }
}

/// `eˣ` in f32, within a few ulp of the exact value for x in [-87, 88] (clamped outside, where
/// it under- or overflows anyway): x = n·ln2 + r with |r| ≤ ln2/2, Cephes' degree-6 polynomial
/// for eʳ, and 2ⁿ built in the exponent bits. Branch-free, so loops over slices vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

pub(crate) fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &burn::backend::ndarray::NdArrayDevice) -> Tensor<NdArray, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// A copy of a tensor's values (one memcpy: `into_data` on a shared array walks it element by
/// element through dynamic indexing, measured at a fifth of a training step for AdamW's inputs).
pub(crate) fn host<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f32> {
    with_f32(t, |v| v.to_vec())
}

/// A raw pointer that parallel tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// A method, so that closures capture the whole `Shared` (Send) rather than its raw field.
    pub(crate) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `c[m, n] = alpha·a·b + beta·c` (c's row stride `ldc`), `a` `[m, k]` and `b` `[k, n]` given
/// as (values, row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(m: usize, k: usize, n: usize, alpha: f32, (a, rsa, csa): (&[f32], usize, usize), (b, rsb, csb): (&[f32], usize, usize), beta: f32, c: &mut [f32], ldc: usize) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    assert!(a.len() >= extent(m, k, rsa, csa) && b.len() >= extent(k, n, rsb, csb) && c.len() >= extent(m, n, ldc, 1), "gemm operands smaller than [{m}, {k}] · [{k}, {n}]");
    // The gemm crate's order is dst := alpha·dst + beta·lhs·rhs (dst read only when asked), so
    // our alpha and beta trade places.
    // SAFETY: every operand's extent under its strides is checked above; c aliases neither.
    unsafe {
        gemm::gemm(m, n, k, c.as_mut_ptr(), 1, ldc as isize, beta != 0.0, a.as_ptr(), csa as isize, rsa as isize, b.as_ptr(), csb as isize, rsb as isize, beta, alpha, false, false, false, gemm::Parallelism::Rayon(rayon::current_num_threads()));
    }
}

/// One head's `[t, d]` values, row i read at `x[i·stride..]`, with transformers' rotate-half
/// RoPE on the first `rot` dims (tables `[t, rot]`), into `out` `[t, d]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_head(x: &[f32], stride: usize, t: usize, d: usize, cos: &[f32], sin: &[f32], rot: usize, out: &mut [f32]) {
    let half = rot / 2;
    for i in 0..t {
        let x = &x[i * stride..i * stride + d];
        let (c, s) = (&cos[i * rot..(i + 1) * rot], &sin[i * rot..(i + 1) * rot]);
        let o = &mut out[i * d..(i + 1) * d];
        for j in 0..half {
            o[j] = x[j] * c[j] - x[j + half] * s[j];
            o[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
        }
        o[rot..].copy_from_slice(&x[rot..]);
    }
}

/// The transpose of [`rope_head`]: the gradient of its input from `dy` `[t, d]`, row i written
/// at `out.at(i·stride)`.
///
/// SAFETY: the caller owns rows `out.at(i·stride)..+d` for i < t, and no one else writes them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rope_head_backward(dy: &[f32], t: usize, d: usize, cos: &[f32], sin: &[f32], rot: usize, out: Shared, stride: usize) {
    let half = rot / 2;
    for i in 0..t {
        let g = &dy[i * d..(i + 1) * d];
        let (c, s) = (&cos[i * rot..(i + 1) * rot], &sin[i * rot..(i + 1) * rot]);
        let o = std::slice::from_raw_parts_mut(out.at(i * stride), d);
        for j in 0..half {
            o[j] = g[j] * c[j] + g[j + half] * s[j + half];
            o[j + half] = g[j + half] * c[j + half] - g[j] * s[j];
        }
        o[rot..].copy_from_slice(&g[rot..]);
    }
}

/// Rows of `t` scores, plus the additive mask, to probabilities in place; masked (-inf)
/// entries get exactly 0.
pub(crate) fn softmax_rows(p: &mut [f32], mask: &[f32], t: usize) {
    for (row, m) in p.chunks_exact_mut(t).zip(mask.chunks_exact(t)) {
        let mut max = f32::NEG_INFINITY;
        for (v, &m) in row.iter_mut().zip(m) {
            *v += m;
            max = if *v > max { *v } else { max };
        }
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { exp(*v - max) };
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Writes `rows` rows of `d` values from `src` `[rows, d]` at `dst.at(i·stride)`.
///
/// SAFETY: as [`rope_head_backward`].
pub(crate) unsafe fn scatter_rows(src: &[f32], rows: usize, d: usize, dst: Shared, stride: usize) {
    for i in 0..rows {
        std::ptr::copy_nonoverlapping(src[i * d..].as_ptr(), dst.at(i * stride), d);
    }
}

pub(crate) fn targets_vec(targets: Tensor<NdArray, 1, Int>) -> Vec<i64> {
    targets.into_data().convert::<i64>().to_vec::<i64>().expect("targets are integers")
}


#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.7e-5;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        // f32 has 2^-24 ≈ 6e-8 relative precision: a few ulp.
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(0.0) == 1.0);
    }
}

