//! The fused ops on the CPU backend: one pass over each array, split across threads, with an
//! exponential written so that its loops vectorize (libm's `expf` is one call per value).

use super::{AdamWScalars, AttentionShape, FusedOps};
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

/// A copy of a tensor's values (one memcpy: `into_data` on a shared array walks it element by
/// element through dynamic indexing, measured at a fifth of a training step for AdamW's inputs).
fn host<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f32> {
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
    // SAFETY: every operand's extent under its strides is checked above; c aliases neither.
    unsafe {
        matrixmultiply::sgemm(m, k, n, alpha, a.as_ptr(), rsa as isize, csa as isize, b.as_ptr(), rsb as isize, csb as isize, beta, c.as_mut_ptr(), ldc as isize, 1);
    }
}

/// One head's `[t, d]` values, row i read at `x[i·stride..]`, with transformers' rotate-half
/// RoPE on the first `rot` dims (tables `[t, rot]`), into `out` `[t, d]`.
#[allow(clippy::too_many_arguments)]
fn rope_head(x: &[f32], stride: usize, t: usize, d: usize, cos: &[f32], sin: &[f32], rot: usize, out: &mut [f32]) {
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
unsafe fn rope_head_backward(dy: &[f32], t: usize, d: usize, cos: &[f32], sin: &[f32], rot: usize, out: Shared, stride: usize) {
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
fn softmax_rows(p: &mut [f32], mask: &[f32], t: usize) {
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
unsafe fn scatter_rows(src: &[f32], rows: usize, d: usize, dst: Shared, stride: usize) {
    for i in 0..rows {
        std::ptr::copy_nonoverlapping(src[i * d..].as_ptr(), dst.at(i * stride), d);
    }
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

    /// One pass over the four arrays (read in place, new ones written), in the tensor-op
    /// version's order of operations.
    fn adamw(param: Tensor<Self, 2>, grad: Tensor<Self, 2>, exp_avg: Tensor<Self, 2>, exp_avg_sq: Tensor<Self, 2>, s: AdamWScalars) -> [Tensor<Self, 2>; 3] {
        let shape = param.dims();
        let device = param.device();
        let n = shape[0] * shape[1];
        let (mut p, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let c = |x: f64| x as f32;
        let (decay, w1, b2, w2, bc2, eps, step) = (c(s.decay), c(s.beta1_weight), c(s.beta2), c(s.beta2_weight), c(s.bias_correction2_sqrt), c(s.eps), c(s.step_size));
        with_f32(param, |p0| {
            with_f32(grad, |g| {
                with_f32(exp_avg, |m0| {
                    with_f32(exp_avg_sq, |v0| {
                        let outs = p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)));
                        let ins = p0.par_chunks(CHUNK).zip(g.par_chunks(CHUNK).zip(m0.par_chunks(CHUNK).zip(v0.par_chunks(CHUNK))));
                        outs.zip(ins).for_each(|((p, (m, v)), (p0, (g, (m0, v0))))| {
                            for i in 0..p.len() {
                                m[i] = m0[i] + (g[i] - m0[i]) * w1;
                                v[i] = v0[i] * b2 + g[i] * g[i] * w2;
                                p[i] = p0[i] * decay - m[i] / (v[i].sqrt() / bc2 + eps) * step;
                            }
                        })
                    })
                })
            })
        });
        [tensor(p, shape, &device), tensor(m, shape, &device), tensor(v, shape, &device)]
    }

    fn rms_norm(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, d] = x.dims();
        let device = x.device();
        let w = host(w);
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
        let w = host(w);
        let r = host(r);
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

    /// One task per (batch row, kv head): its query heads, so that k/v gradients of a group
    /// are summed inside one task. Small products through the GEMM on strided views: no
    /// transposed or per-head copies of q, k, v.
    fn self_attention(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], mask: Tensor<Self, 4>, shape: AttentionShape) -> Option<(Tensor<Self, 2>, Tensor<Self, 1>)> {
        let AttentionShape { batch: b, seq: t, heads: nh, kv_heads: nkv, head_dim: d } = shape;
        let [cb, _, _, rot] = rope[0].dims();
        let [mb, _, mt, ms] = mask.dims();
        assert!(mt == t && ms == t && nh % nkv == 0 && rot <= d && rot % 2 == 0, "attention: mask [{mt}, {ms}] for {t} tokens, {nh} heads over {nkv}, rot {rot} of {d}");
        let device = q.device();
        let (group, scale) = (nh / nkv, 1.0 / (d as f32).sqrt());
        let [cos, sin] = rope.map(host);
        let mask = host(mask);
        let (mut out, mut probs) = (vec![0f32; b * t * nh * d], vec![0f32; b * nh * t * t]);
        let (o_at, p_at) = (Shared(out.as_mut_ptr()), Shared(probs.as_mut_ptr()));
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    (0..b * nkv).into_par_iter().for_each(|task| {
                        let (bi, g) = (task / nkv, task % nkv);
                        let tab = if cb == 1 { 0 } else { bi } * t * rot;
                        let (cos, sin) = (&cos[tab..tab + t * rot], &sin[tab..tab + t * rot]);
                        let m = &mask[if mb == 1 { 0 } else { bi } * t * t..][..t * t];
                        let (mut kr, mut qr, mut oh) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
                        rope_head(&k[bi * t * nkv * d + g * d..], nkv * d, t, d, cos, sin, rot, &mut kr);
                        let vg = &v[bi * t * nkv * d + g * d..];
                        for h in g * group..(g + 1) * group {
                            rope_head(&q[bi * t * nh * d + h * d..], nh * d, t, d, cos, sin, rot, &mut qr);
                            // SAFETY: (bi, h) belongs to this task alone.
                            let p = unsafe { std::slice::from_raw_parts_mut(p_at.at((bi * nh + h) * t * t), t * t) };
                            gemm(t, d, t, scale, (&qr, d, 1), (&kr, 1, d), 0.0, p, t);
                            softmax_rows(p, m, t);
                            gemm(t, t, d, 1.0, (p, t, 1), (vg, nkv * d, 1), 0.0, &mut oh, d);
                            // SAFETY: head h's columns of batch row bi belong to this task alone.
                            unsafe { scatter_rows(&oh, t, d, Shared(o_at.at(bi * t * nh * d + h * d)), nh * d) };
                        }
                    })
                })
            })
        });
        Some((tensor(out, [b * t, nh * d], &device), tensor(probs, [b * nh * t * t], &device)))
    }

    fn self_attention_backward(q: Tensor<Self, 2>, k: Tensor<Self, 2>, v: Tensor<Self, 2>, rope: [Tensor<Self, 4>; 2], probs: Tensor<Self, 1>, dy: Tensor<Self, 2>, shape: AttentionShape) -> [Tensor<Self, 2>; 3] {
        let AttentionShape { batch: b, seq: t, heads: nh, kv_heads: nkv, head_dim: d } = shape;
        let [cb, _, _, rot] = rope[0].dims();
        let device = q.device();
        let (group, scale) = (nh / nkv, 1.0 / (d as f32).sqrt());
        let [cos, sin] = rope.map(host);
        let (mut dq, mut dk, mut dv) = (vec![0f32; b * t * nh * d], vec![0f32; b * t * nkv * d], vec![0f32; b * t * nkv * d]);
        let (dq_at, dk_at, dv_at) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(probs, |probs| {
                        with_f32(dy, |dy| {
                            (0..b * nkv).into_par_iter().for_each(|task| {
                                let (bi, g) = (task / nkv, task % nkv);
                                let tab = if cb == 1 { 0 } else { bi } * t * rot;
                                let (cos, sin) = (&cos[tab..tab + t * rot], &sin[tab..tab + t * rot]);
                                let (mut kr, mut qr, mut dqr) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
                                let (mut dkr, mut dvg, mut ds) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * t]);
                                rope_head(&k[bi * t * nkv * d + g * d..], nkv * d, t, d, cos, sin, rot, &mut kr);
                                let vg = &v[bi * t * nkv * d + g * d..];
                                for h in g * group..(g + 1) * group {
                                    let p = &probs[(bi * nh + h) * t * t..][..t * t];
                                    let doh = &dy[bi * t * nh * d + h * d..];
                                    // dV += Pᵀ·dO; dP = dO·Vᵀ
                                    gemm(t, t, d, 1.0, (p, 1, t), (doh, nh * d, 1), 1.0, &mut dvg, d);
                                    gemm(t, d, t, 1.0, (doh, nh * d, 1), (vg, 1, nkv * d), 0.0, &mut ds, t);
                                    // dS = P∘(dP − Σ dP∘P), times the scores' scale
                                    for (row, prow) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                                        let dot: f32 = row.iter().zip(prow).map(|(a, b)| a * b).sum();
                                        for (x, &pp) in row.iter_mut().zip(prow) {
                                            *x = pp * (*x - dot) * scale;
                                        }
                                    }
                                    rope_head(&q[bi * t * nh * d + h * d..], nh * d, t, d, cos, sin, rot, &mut qr);
                                    // dQ = dS·K; dK += dSᵀ·Q (both rotated), then RoPE's transpose.
                                    gemm(t, t, d, 1.0, (&ds, t, 1), (&kr, d, 1), 0.0, &mut dqr, d);
                                    gemm(t, t, d, 1.0, (&ds, 1, t), (&qr, d, 1), 1.0, &mut dkr, d);
                                    // SAFETY: head h's columns of batch row bi belong to this task alone.
                                    unsafe { rope_head_backward(&dqr, t, d, cos, sin, rot, Shared(dq_at.at(bi * t * nh * d + h * d)), nh * d) };
                                }
                                // SAFETY: kv head g's columns of batch row bi belong to this task alone.
                                unsafe {
                                    rope_head_backward(&dkr, t, d, cos, sin, rot, Shared(dk_at.at(bi * t * nkv * d + g * d)), nkv * d);
                                    scatter_rows(&dvg, t, d, Shared(dv_at.at(bi * t * nkv * d + g * d)), nkv * d);
                                }
                            })
                        })
                    })
                })
            })
        });
        [tensor(dq, [b * t, nh * d], &device), tensor(dk, [b * t, nkv * d], &device), tensor(dv, [b * t, nkv * d], &device)]
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
        let lse = host(lse);
        let dy = host(dy);
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
