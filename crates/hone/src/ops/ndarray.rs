//! hone's ops on burn's NdArray CPU backend: each one threaded pass over the backend's own
//! arrays (read in place), GEMMs through the `gemm` crate on strided views (on rayon's threads), and NF4 weights
//! multiplied by the kernels of [`super::nf4_gemm`] where the CPU has them.

use super::cpu::{exp, gemm, host, scatter_rows, softmax_rows, rope_head, rope_head_backward, targets_vec, tensor, with_f32, Shared, CHUNK};
use super::{AdamWScalars, AttentionShape, FrozenWeight, HoneBackend};
use super::nf4_gemm::{Absmax, Codes, Words};
use crate::quant::dynamic_map::dynamic_map_table;
use crate::quant::frozen::{PackedWeight, StoredFloat};
use crate::quant::nf4::NF4_CODE;
use crate::quant::Nf4Weight;
use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use rayon::prelude::*;

/// At most this many rows of `x` take the matrix-vector path on the CPU (generation's one new
/// token per sequence).
const GEMV_ROWS: usize = 4;

impl HoneBackend for NdArray {
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


    /// A few rows (generation): one dot product per weight row, rows split across threads. A
    /// GEMM library packs the whole weight into panels on every call, which for one token costs
    /// more than the product (measured on SmolLM2: 61% of generation time in packing).
    ///
    /// More rows (training, prompts): one GEMM reading W in its stored `[out, in]` layout as Wᵀ
    /// through strides, into a contiguous `[m, out]` (burn's matmul on a transposed operand
    /// leaves a transposed result that the next op copies whole). NF4 weights go through the
    /// fused kernels where the CPU has them; packed 16-bit weights a chunk of rows at a time.
    fn frozen_matmul(x: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        let [m, k] = x.dims();
        let device = x.device();
        let [n, _] = w.dims();
        if m > GEMV_ROWS {
            if let Some(out) = with_nf4_codes(w, |codes| with_f32(x.clone(), |x| super::nf4_gemm::matmul_t(x, m, codes, n, k))) {
                return tensor(out, [m, n], &device);
            }
            if w.packed.is_some() || w.nf4.is_some() {
                let mut y = vec![0f32; m * n];
                // Columns r0.. of y from rows r0.. of W: y[:, r0..] = x · W[r0..]ᵀ.
                with_f32(x, |x| row_chunks(w, |r0, rows, wc| gemm(m, k, rows, 1.0, (x, k, 1), (wc, 1, k), 0.0, &mut y[r0..], n)));
                return tensor(y, [m, n], &device);
            }
            // y[m, n] = x[m, k] · Wᵀ, W[n, k] row-major: Wᵀ has row stride 1, column stride k.
            return dense_gemm(m, k, n, w.to_dense(), (1, k), x);
        }
        // Output laid out [n, m] while computing (one weight row per task), transposed after.
        let mut y = vec![0f32; m * n];
        with_f32(x, |x| {
            let rows = |out: &mut [f32], row: &[f32]| {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = super::simd::dot(row, &x[r * k..(r + 1) * k]);
                }
            };
            match &w.packed {
                Some(p) => packed_row_tasks(p, &mut y, m, rows),
                None if w.nf4.is_some() => row_chunks(w, |r0, n_rows, wc| y[r0 * m..(r0 + n_rows) * m].par_chunks_mut(m).zip(wc.par_chunks(k)).for_each(|(out, row)| rows(out, row))),
                None => with_f32(w.to_dense(), |weight| y.par_chunks_mut(m).zip(weight.par_chunks(k)).for_each(|(out, row)| rows(out, row))),
            }
        });
        let yt: Vec<f32> = (0..m * n).map(|i| y[(i % n) * m + i / n]).collect();
        tensor(yt, [m, n], &device)
    }

    /// dx[m, k] = dy[m, n] · W[n, k], both row-major.
    fn frozen_matmul_backward(dy: Tensor<Self, 2>, w: &FrozenWeight<Self>) -> Tensor<Self, 2> {
        let [m, n] = dy.dims();
        let [_, k] = w.dims();
        let device = dy.device();
        if let Some(dx) = with_nf4_codes(w, |codes| with_f32(dy.clone(), |dy| super::nf4_gemm::matmul(dy, m, codes, n, k))) {
            return tensor(dx, [m, k], &device);
        }
        if w.packed.is_some() || w.nf4.is_some() {
            // dx = Σ over chunks of dy[:, r0..] · W[r0..].
            let mut dx = vec![0f32; m * k];
            with_f32(dy, |dy| row_chunks(w, |r0, rows, wc| gemm(m, rows, k, 1.0, (&dy[r0..], n, 1), (wc, k, 1), 1.0, &mut dx, k)));
            return tensor(dx, [m, k], &device);
        }
        dense_gemm(m, n, k, w.to_dense(), (k, 1), dy)
    }

    /// Each row read where it lies and converted on its own (no table-sized copy).
    fn frozen_rows(w: &FrozenWeight<Self>, ids: Tensor<Self, 1, Int>) -> Tensor<Self, 2> {
        let Some(p) = &w.packed else { return w.to_dense().select(0, ids) };
        let device = ids.device();
        let ids = targets_vec(ids);
        let cols = p.cols;
        let mut out = vec![0f32; ids.len() * cols];
        let parts: Vec<&[i32]> = p.parts.iter().map(words).collect();
        out.par_chunks_mut(cols).zip(&ids).for_each(|(row, &id)| {
            let id = usize::try_from(id).ok().filter(|&i| i < p.rows).unwrap_or_else(|| panic!("token id {id} is outside the table's {} rows", p.rows));
            let (part, local) = (id / p.rows_per_part, id % p.rows_per_part);
            let row_words = cols / p.format.per_word();
            p.format.decode_words(&parts[part][local * row_words..(local + 1) * row_words], row);
        });
        tensor(out, [ids.len(), cols], &device)
    }

    fn unpack_words(w: Tensor<Self, 1, Int>, format: StoredFloat) -> Tensor<Self, 1> {
        let device = w.device();
        let n = w.dims()[0] * format.per_word();
        let mut out = vec![0f32; n];
        let words = words(&w);
        out.par_chunks_mut(CHUNK).zip(words.par_chunks(CHUNK / format.per_word())).for_each(|(o, w)| format.decode_words(w, o));
        tensor(out, [n], &device)
    }

    /// The frozen product as above, then the low-rank term added into it by two GEMMs
    /// (operands read through strides, nothing transposed or copied).
    fn lowrank_forward(x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scaling: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let [m, k] = x.dims();
        let [r, _] = a.dims();
        let [n, _] = w.dims();
        let device = x.device();
        let mut y = into_values(Self::frozen_matmul(x.clone(), w));
        let mut t = vec![0f32; m * r];
        with_f32(x, |x| with_f32(a, |a| gemm(m, k, r, 1.0, (x, k, 1), (a, 1, k), 0.0, &mut t, r)));
        with_f32(b, |b| gemm(m, r, n, scaling as f32, (&t, r, 1), (b, 1, r), 1.0, &mut y, n));
        (tensor(y, [m, n], &device), tensor(t, [m, r], &device))
    }

    fn lowrank_backward(dy: Tensor<Self, 2>, x: Tensor<Self, 2>, w: &FrozenWeight<Self>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, t: Tensor<Self, 2>, scaling: f64) -> [Tensor<Self, 2>; 3] {
        let [m, n] = dy.dims();
        let [r, k] = a.dims();
        let device = dy.device();
        let mut dx = into_values(Self::frozen_matmul_backward(dy.clone(), w));
        let (mut g, mut da, mut db) = (vec![0f32; m * r], vec![0f32; r * k], vec![0f32; n * r]);
        let s = scaling as f32;
        with_f32(dy, |dy| {
            // g = s·dy·B [m, r]; db = s·dyᵀ·t [n, r]
            with_f32(b, |b| gemm(m, n, r, s, (dy, n, 1), (b, r, 1), 0.0, &mut g, r));
            with_f32(t, |t| gemm(n, m, r, s, (dy, 1, n), (t, r, 1), 0.0, &mut db, r));
        });
        // dx += g·A [m, k]; da = gᵀ·x [r, k]
        with_f32(a, |a| gemm(m, r, k, 1.0, (&g, r, 1), (a, k, 1), 1.0, &mut dx, k));
        with_f32(x, |x| gemm(r, m, k, 1.0, (&g, 1, r), (x, k, 1), 0.0, &mut da, k));
        [tensor(dx, [m, k], &device), tensor(da, [r, k], &device), tensor(db, [n, r], &device)]
    }

    /// On the CPU the codes are already in host memory: one tight loop over the backend's own
    /// arrays (words read in place, blocks split across threads), `blocksize` values per absmax and
    /// a byte-to-two-codes table (measured on SmolLM2: dequantizing went from a third of a
    /// training step's time to a few percent).
    fn nf4_dequantize(w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        const BLOCKS: usize = 256;
        let n = w.out_features * w.in_features;
        let mut values = vec![0f32; w.blocks() * w.blocksize];
        // Byte b holds element 2j in its high nibble and 2j+1 in its low one; a word holds 4
        // bytes (8 values), little-endian.
        let pairs: [[f32; 2]; 256] = std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 15]]);
        let piece = BLOCKS * w.blocksize;
        nf4_codes(w, |codes| {
            // Blocks split across threads: each piece decodes its words, then scales.
            values.par_chunks_mut(piece).enumerate().for_each(|(p, out)| {
                let first = p * piece / 8;
                for (i, o) in out.chunks_mut(8).enumerate().take(codes.words.len().saturating_sub(first)) {
                    for (pair, b) in o.chunks_exact_mut(2).zip(codes.words.word(first + i).to_le_bytes()) {
                        pair.copy_from_slice(&pairs[b as usize]);
                    }
                }
                for (j, block) in out.chunks_exact_mut(w.blocksize).enumerate() {
                    let scale = codes.absmax.get(p * BLOCKS + j);
                    block.iter_mut().for_each(|v| *v *= scale);
                }
            });
        });
        values.truncate(n);
        tensor(values, [w.out_features, w.in_features], &w.words.device())
    }
}

/// The i32 words of an integer tensor, in place (the frozen formats keep them as i32).
fn words(t: &Tensor<NdArray, 1, Int>) -> &[i32] {
    // SAFETY-free borrow: the primitive is cloned (a shared handle), and its array outlives the
    // call only through `t`, which the caller holds.
    match t.clone().into_primitive() {
        NdArrayTensor::I32(s) => {
            let view = s.view();
            let slice = view.as_slice().expect("words are built contiguous");
            // SAFETY: the array is shared with `t` (an Arc), so its memory lives as long as `t`.
            unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) }
        }
        other => panic!("frozen words stored as {:?}, not i32", burn::tensor::TensorMetadata::dtype(&other)),
    }
}

/// The f32 values of a float tensor, in place (contiguous ones only).
fn floats(t: &Tensor<NdArray, 1>) -> &[f32] {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(s)) => {
            let view = s.view();
            let slice = view.as_slice().expect("built contiguous");
            // SAFETY: as in [`words`].
            unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) }
        }
        _ => panic!("frozen statistics must be f32"),
    }
}

/// An f32 packed part's words as its f32 values (the same bits).
fn as_f32(words: &[i32]) -> &[f32] {
    // SAFETY: i32 and f32 have the same size and alignment, and every bit pattern is an f32.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len()) }
}

/// Calls `f(first row, rows, values [rows, cols])` for the rows of a packed weight in order:
/// each part of f32 words read in place, 16-bit ones decoded a chunk of rows at a time.
fn packed_chunks(p: &PackedWeight<NdArray>, mut f: impl FnMut(usize, usize, &[f32])) {
    let row_words = p.cols / p.format.per_word();
    let step = super::packed::chunk_rows(p.cols);
    let mut buf = Vec::new();
    for (part, t) in p.parts.iter().enumerate() {
        let (start, rows) = p.part_rows(part);
        let w = words(t);
        if p.format == StoredFloat::F32 {
            f(start, rows, as_f32(w));
            continue;
        }
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            buf.resize(n * p.cols, 0f32);
            buf.par_chunks_mut(p.cols).zip(w[r0 * row_words..(r0 + n) * row_words].par_chunks(row_words)).for_each(|(o, w)| p.format.decode_words(w, o));
            f(start + r0, n, &buf);
        }
    }
}

/// Calls `f(first row, rows, values [rows, cols])` over a packed or NF4 weight's rows in order,
/// a chunk at a time (see [`packed_chunks`]; NF4 rows are dequantized into one reused buffer of
/// a few MB, so a weight-sized f32 copy never exists, where the fused kernels are missing).
fn row_chunks(w: &FrozenWeight<NdArray>, mut f: impl FnMut(usize, usize, &[f32])) {
    if let Some(p) = &w.packed {
        return packed_chunks(p, f);
    }
    let q = w.nf4.as_ref().expect("a packed or NF4 weight");
    let (n, k) = (q.out_features, q.in_features);
    let step = super::packed::chunk_rows(k);
    let mut buf = vec![0f32; step.min(n) * k];
    nf4_codes(q, |codes| {
        for r0 in (0..n).step_by(step) {
            let rows = step.min(n - r0);
            let out = &mut buf[..rows * k];
            // Pieces of whole blocks across threads, each decoded value by value.
            let piece = (16 * 1024 / codes.blocksize).max(1) * codes.blocksize;
            out.par_chunks_mut(piece).enumerate().for_each(|(i, o)| decode_nf4(codes, r0 * k + i * piece, o));
            f(r0, rows, out);
        }
    });
}

/// NF4 values `start..start + out.len()` (flat indices into W), `code · absmax` as dequantizing
/// computes them.
fn decode_nf4(codes: &Codes, start: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < out.len() {
        let at = start + i;
        let block = at / codes.blocksize;
        let end = ((block + 1) * codes.blocksize - start).min(out.len());
        let scale = codes.absmax.get(block);
        for (j, o) in out[i..end].iter_mut().enumerate() {
            let idx = at + j;
            let byte = codes.words.word(idx / 8).to_le_bytes()[idx % 8 / 2];
            let q = if idx % 2 == 0 { byte >> 4 } else { byte & 15 };
            *o = NF4_CODE[q as usize] * scale;
        }
        i = end;
    }
}

/// One task per weight row of a packed weight: `f(out row of y [n, m], the row's f32 values)`.
fn packed_row_tasks(p: &PackedWeight<NdArray>, y: &mut [f32], m: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
    let row_words = p.cols / p.format.per_word();
    for (part, t) in p.parts.iter().enumerate() {
        let (start, rows) = p.part_rows(part);
        let w = words(t);
        let out = &mut y[start * m..(start + rows) * m];
        if p.format == StoredFloat::F32 {
            out.par_chunks_mut(m).zip(as_f32(w).par_chunks(p.cols)).for_each(|(o, row)| f(o, row));
        } else {
            out.par_chunks_mut(m).zip(w.par_chunks(row_words)).for_each_init(
                || vec![0f32; p.cols],
                |buf, (o, row)| {
                    p.format.decode_words(row, buf);
                    f(o, buf)
                },
            );
        }
    }
}

/// Runs `f` on an NF4 weight's codes, read in place from the backend's arrays.
fn nf4_codes<R>(q: &Nf4Weight<NdArray>, f: impl FnOnce(&Codes) -> R) -> R {
    let absmax = match (&q.absmax, &q.absmax_codes, &q.nested) {
        (Some(a), _, _) => Absmax::Plain(floats(a)),
        (None, Some(codes), Some(scales)) => Absmax::Nested { codes: words(codes), scales: floats(scales), table: dynamic_map_table() },
        _ => panic!("an NF4 weight has plain or double-quantized absmax"),
    };
    f(&Codes { words: Words::I32(words(&q.words)), absmax, blocksize: q.blocksize })
}

/// [`nf4_codes`] where the fused kernels apply at this CPU's level (see [`super::nf4_gemm::supported`]);
/// `None` for other weights and other machines.
fn with_nf4_codes<R>(w: &FrozenWeight<NdArray>, f: impl FnOnce(&Codes) -> R) -> Option<R> {
    let q = w.nf4.as_ref()?;
    super::nf4_gemm::supported(q.in_features, q.blocksize).then(|| nf4_codes(q, f))
}

/// `a[m, k] · B` into a new contiguous `[m, n]`, B a dense `[·]` weight read with strides
/// `(row, column)` as a `[k, n]` matrix; `a` an activation, borrowed when contiguous.
fn dense_gemm(m: usize, k: usize, n: usize, b: Tensor<NdArray, 2>, strides: (usize, usize), a: Tensor<NdArray, 2>) -> Tensor<NdArray, 2> {
    let device = a.device();
    let mut c = vec![0f32; m * n];
    with_f32(b, |b| with_f32(a, |a| gemm(m, k, n, 1.0, (a, k, 1), (b, strides.0, strides.1), 0.0, &mut c, n)));
    tensor(c, [m, n], &device)
}

/// The values of a contiguous tensor this op just made, taken without a copy when unshared.
fn into_values(t: Tensor<NdArray, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().expect("hone computes in f32")
}

