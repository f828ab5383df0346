//! NF4 frozen matmuls on x86-64 CPUs with AVX-512: `x·Wᵀ` and `dy·W` with W decoded from its
//! codes straight into the small tiles the kernel reads, never into a whole dense weight.
//!
//! Why: with a few hundred rows (a training micro-batch) a GEMM library spends as much time
//! moving W as multiplying: dequantize into a full f32 copy, then pack that copy into panels.
//! Here 32 codes become 32 floats in a handful of instructions (a 16-entry table lookup is one
//! `vpermps`), written where the multiply reads them. The values are the same
//! `code × absmax` f32 products as [`crate::quant::Nf4Weight`]'s dequantization, bit for bit.
//!
//! Both products use one register-blocked kernel: `acc[r][0..32] += a[r][p] · panel[p][0..32]`
//! for 12 rows `r`, 24 zmm accumulators.
//! - forward, `yᵀ = W·xᵀ`: `a` = 12 decoded rows of W, the panel = 32 rows of x, transposed;
//! - backward, `dx = dy·W`: `a` = 12 rows of dy, the panel = 32 decoded columns of W.

use crate::ops::cpu::Shared;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `a` per kernel call, and the panel's width.
const MR: usize = 12;
const NR: usize = 32;

/// NF4 codes as a flat view: `words` little-endian u32 (8 codes each, the first in the high
/// nibble of byte 0), one absmax per `blocksize` values.
pub struct Codes<'a> {
    pub words: Words<'a>,
    pub absmax: Absmax<'a>,
    pub blocksize: usize,
}

/// A block's absmax: stored as f32, or double-quantized as bitsandbytes keeps it (see
/// [`crate::quant::Nf4Weight`]) and expanded here, in its order of operations.
#[derive(Clone, Copy)]
pub enum Absmax<'a> {
    Plain(&'a [f32]),
    /// 8-bit codes, 4 per word; one scale per 256 blocks, then the offset.
    Nested { codes: &'a [i32], scales: &'a [f32], table: &'a [f32; 256] },
}

impl Absmax<'_> {
    #[inline(always)]
    pub fn get(&self, block: usize) -> f32 {
        match self {
            Absmax::Plain(a) => a[block],
            Absmax::Nested { codes, scales, table } => {
                let code = (codes[block / 4] as u32 >> (8 * (block % 4))) & 255;
                // Two roundings, as bitsandbytes: the product, then the offset added.
                let scaled = table[code as usize] * scales[block / crate::quant::nf4::NESTED_BLOCKSIZE];
                scaled + scales[scales.len() - 1]
            }
        }
    }
}

/// The codes' i32 words (4 bits per weight on every backend).
#[derive(Clone, Copy)]
pub enum Words<'a> {
    I32(&'a [i32]),
}

impl Words<'_> {
    #[inline(always)]
    pub fn word(&self, i: usize) -> u32 {
        match self {
            Words::I32(w) => w[i] as u32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Words::I32(w) => w.len(),
        }
    }
}

/// Whether this machine and these shapes take the fused path: AVX-512, rows of W in whole
/// 32-value runs, each run inside one absmax block.
pub fn supported(in_features: usize, blocksize: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        in_features % NR == 0 && blocksize % NR == 0 && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (in_features, blocksize);
        false
    }
}

/// `y[m, n] = x[m, k] · Wᵀ`, W `[n, k]` in NF4. Call only where [`supported`] holds.
#[cfg(target_arch = "x86_64")]
pub fn matmul_t(x: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    assert!(supported(k, w.blocksize) && x.len() >= m * k);
    // x in panels of NR rows, each stored k-major: panel[p][c] = x[row c][p], zero-padded.
    let panels = m.div_ceil(NR);
    let mut xp = vec![0f32; panels * k * NR];
    xp.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
        for c in 0..NR.min(m - p * NR) {
            let row = &x[(p * NR + c) * k..(p * NR + c + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + c] = v;
            }
        }
    });
    let mut y = vec![0f32; m * n];
    let out = Shared(y.as_mut_ptr());
    (0..n.div_ceil(MR)).into_par_iter().for_each_init(
        || vec![0f32; MR * k],
        |a, tile| {
            let j0 = tile * MR;
            let rows = MR.min(n - j0);
            for r in 0..rows {
                // SAFETY: avx512f checked by `supported`; row j0+r is inside W.
                unsafe { decode_run(w, (j0 + r) * k, k, &mut a[r * k..(r + 1) * k]) };
            }
            let mut acc = [0f32; MR * NR];
            for p in 0..panels {
                // SAFETY: a holds `rows` rows of k; the panel holds k × NR values.
                unsafe { kernel(k, a.as_ptr(), k, rows, xp[p * k * NR..].as_ptr(), &mut acc) };
                for c in 0..NR.min(m - p * NR) {
                    for r in 0..rows {
                        // SAFETY: (p·NR + c, j0 + r) is inside y; tiles write disjoint columns.
                        unsafe { *out.at((p * NR + c) * n + j0 + r) = acc[r * NR + c] };
                    }
                }
            }
        },
    );
    y
}

/// `dx[m, k] = dy[m, n] · W`, W `[n, k]` in NF4. Call only where [`supported`] holds.
#[cfg(target_arch = "x86_64")]
pub fn matmul(dy: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    assert!(supported(k, w.blocksize) && dy.len() >= m * n);
    let mut dx = vec![0f32; m * k];
    let out = Shared(dx.as_mut_ptr());
    (0..k / NR).into_par_iter().for_each_init(
        || vec![0f32; n * NR],
        |panel, q| {
            let k0 = q * NR;
            for j in 0..n {
                // SAFETY: avx512f checked; the run is inside row j of W.
                unsafe { decode_run(w, j * k + k0, NR, &mut panel[j * NR..(j + 1) * NR]) };
            }
            let mut acc = [0f32; MR * NR];
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                // SAFETY: dy rows i0.. hold n values each; the panel holds n × NR.
                unsafe { kernel(n, dy[i0 * n..].as_ptr(), n, rows, panel.as_ptr(), &mut acc) };
                for r in 0..rows {
                    // SAFETY: row i0+r, columns k0..k0+NR are inside dx; panels write disjoint columns.
                    unsafe { std::ptr::copy_nonoverlapping(acc[r * NR..].as_ptr(), out.at((i0 + r) * k + k0), NR) };
                }
            }
        },
    );
    dx
}

/// Decodes `len` values (a multiple of 32) from flat index `at` (a multiple of 32) into `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_run(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    let table = _mm512_loadu_ps(NF4_CODE.as_ptr());
    // Lane 2b reads byte b's high nibble, lane 2b+1 its low one; vpermps uses the low 4 bits.
    const SHIFTS: [i32; 16] = [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0];
    let shifts = _mm512_loadu_si512(SHIFTS.as_ptr().cast());
    for run in 0..len / NR {
        let f = at + run * NR;
        let word = f / 8;
        let bytes: [u32; 4] = std::array::from_fn(|i| w.words.word(word + i).to_le());
        let bytes = _mm_loadu_si128(bytes.as_ptr().cast());
        let scale = _mm512_set1_ps(w.absmax.get(f / w.blocksize));
        for (half, doubled) in [_mm_unpacklo_epi8(bytes, bytes), _mm_unpackhi_epi8(bytes, bytes)].into_iter().enumerate() {
            let idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(doubled), shifts);
            let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), scale);
            _mm512_storeu_ps(out.as_mut_ptr().add(run * NR + half * 16), v);
        }
    }
}

/// `acc[r][c] = Σ_p a[r·lda + p] · panel[p·NR + c]` for r < rows (rows ≤ MR), p < depth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; MR * NR]) {
    // Missing rows repeat the last one: same work, results not stored.
    let row: [*const f32; MR] = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
    let mut c = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..depth {
        let b0 = _mm512_loadu_ps(panel.add(p * NR));
        let b1 = _mm512_loadu_ps(panel.add(p * NR + 16));
        for r in 0..MR {
            let v = _mm512_set1_ps(*row[r].add(p));
            c[r][0] = _mm512_fmadd_ps(v, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(v, b1, c[r][1]);
        }
    }
    for r in 0..MR {
        _mm512_storeu_ps(acc.as_mut_ptr().add(r * NR), c[r][0]);
        _mm512_storeu_ps(acc.as_mut_ptr().add(r * NR + 16), c[r][1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn matmul_t(_x: &[f32], _m: usize, _w: &Codes, _n: usize, _k: usize) -> Vec<f32> {
    unreachable!("the fused NF4 kernels are x86-64 only; `supported` is false here")
}

#[cfg(not(target_arch = "x86_64"))]
pub fn matmul(_dy: &[f32], _m: usize, _w: &Codes, _n: usize, _k: usize) -> Vec<f32> {
    unreachable!("the fused NF4 kernels are x86-64 only; `supported` is false here")
}
