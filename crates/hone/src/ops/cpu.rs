//! The fused ops on the CPU backend: one pass over each array, split across threads, with an
//! exponential written so that its loops vectorize (libm's `expf` is one call per value).

use super::FusedOps;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

/// Values per parallel task in elementwise loops: large enough that scheduling is noise.
const CHUNK: usize = 1 << 14;

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

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &burn::backend::ndarray::NdArrayDevice) -> Tensor<NdArray, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn targets_vec(targets: Tensor<NdArray, 1, Int>) -> Vec<i64> {
    targets.into_data().convert::<i64>().to_vec::<i64>().expect("targets are integers")
}

impl FusedOps for NdArray {
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let shape = gate.dims();
        let device = gate.device();
        let mut y = vec![0f32; shape[0] * shape[1]];
        with_f32(gate, |g| {
            with_f32(up, |u| {
                y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g / (1.0 + exp(-g)) * u;
                    }
                })
            })
        });
        tensor(y, shape, &device)
    }

    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let shape = gate.dims();
        let device = gate.device();
        let n = shape[0] * shape[1];
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(dy, |d| {
                    let outs = dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK));
                    let ins = g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK).zip(d.par_chunks(CHUNK)));
                    outs.zip(ins).for_each(|((dg, du), (g, (u, d)))| {
                        for i in 0..dg.len() {
                            let s = 1.0 / (1.0 + exp(-g[i]));
                            dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                            du[i] = d[i] * g[i] * s;
                        }
                    })
                })
            })
        });
        (tensor(dg, shape, &device), tensor(du, shape, &device))
    }

    fn rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, d] = x.dims();
        let device = x.device();
        let w = w.into_data().to_vec::<f32>().expect("f32 norm weight");
        let (mut y, mut r) = (vec![0f32; rows * d], vec![0f32; rows]);
        with_f32(x, |x| {
            y.par_chunks_mut(d).zip(r.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((y, r), x)| {
                let mean = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (mean + eps as f32).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x * *r * w;
                }
            })
        });
        (tensor(y, [rows, d], &device), tensor(r, [rows], &device))
    }

    fn rms_norm_backward(x: Tensor<Self, 2>, w: Tensor<Self, 1>, r: Tensor<Self, 1>, dy: Tensor<Self, 2>) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, d] = x.dims();
        let device = x.device();
        let w = w.into_data().to_vec::<f32>().expect("f32 norm weight");
        let r = r.into_data().to_vec::<f32>().expect("f32 1/rms");
        let mut dx = vec![0f32; rows * d];
        // dw's sum over rows, one partial per task, added at the end.
        let dw = with_f32(x, |x| {
            with_f32(dy, |dy| {
                dx.par_chunks_mut(d)
                    .zip(x.par_chunks(d).zip(dy.par_chunks(d)).zip(&r))
                    .fold(
                        || vec![0f32; d],
                        |mut dw, (dx, ((x, dy), &r))| {
                            let dot = x.iter().zip(dy).zip(&w).map(|((x, dy), w)| dy * w * x * r).sum::<f32>() / d as f32;
                            for i in 0..d {
                                let xhat = x[i] * r;
                                dx[i] = r * (dy[i] * w[i] - xhat * dot);
                                dw[i] += dy[i] * xhat;
                            }
                            dw
                        },
                    )
                    .reduce(|| vec![0f32; d], |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    })
            })
        });
        (tensor(dx, [rows, d], &device), tensor(dw, [d], &device))
    }

    fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        let [rows, vocab] = logits.dims();
        let device = logits.device();
        let targets = targets_vec(targets);
        let mut nll = vec![0f32; rows];
        let mut lse = vec![0f32; rows];
        with_f32(logits, |x| {
            nll.par_iter_mut().zip(lse.par_iter_mut()).zip(x.par_chunks(vocab).zip(&targets)).for_each(|((nll, lse), (row, &t))| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                let sum: f32 = row.iter().map(|&v| exp(v - max)).sum();
                *lse = max + sum.ln();
                if t >= 0 {
                    let t = usize::try_from(t).expect("non-negative");
                    assert!(t < vocab, "target token {t} is outside the vocabulary of {vocab}");
                    *nll = *lse - row[t];
                }
            })
        });
        (tensor(nll, [rows], &device), tensor(lse, [rows], &device))
    }

    fn cross_entropy_backward(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>, lse: Tensor<Self, 1>, dy: Tensor<Self, 1>) -> Tensor<Self, 2> {
        let [rows, vocab] = logits.dims();
        let device = logits.device();
        let targets = targets_vec(targets);
        let lse = lse.into_data().to_vec::<f32>().expect("f32 log-sum-exp");
        let dy = dy.into_data().to_vec::<f32>().expect("f32 gradient");
        let mut dx = vec![0f32; rows * vocab];
        with_f32(logits, |x| {
            dx.par_chunks_mut(vocab).zip(x.par_chunks(vocab)).enumerate().for_each(|(i, (out, row))| {
                let t = targets[i];
                if t < 0 {
                    return;
                }
                let (scale, lse) = (dy[i], lse[i]);
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = scale * exp(v - lse);
                }
                out[t as usize] -= scale;
            })
        });
        tensor(dx, [rows, vocab], &device)
    }
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
