//! NF4 frozen matmuls on x86-64 (AVX2+FMA, AVX-512) and aarch64 (NEON) CPUs: `x·Wᵀ` and `dy·W`
//! with W decoded from its codes straight into the small tiles the kernel reads, never into a
//! whole dense weight. The level is [`CpuLevel::current`] (detected; `HONE_CPU_LEVEL` forces one).
//!
//! Why: with a few hundred rows (a training micro-batch) a GEMM library spends as much time
//! moving W as multiplying: dequantize into a full f32 copy, then pack that copy into panels.
//! Here codes become floats a run at a time (on AVX-512 a 16-entry table lookup is one
//! `vpermps`; AVX2 blends two; NEON gathers each float's bytes with one `vqtbl4q_u8`), written
//! where the multiply reads them. The values are the same
//! `code × absmax` f32 products as [`crate::quant::Nf4Weight`]'s dequantization, bit for bit.
//!
//! Both products use one register-blocked kernel per level: `acc[r][0..NR] += a[r][p] ·
//! panel[p][0..NR]` for MR rows `r` (AVX-512: 12 × 32, 24 zmm accumulators; AVX2 and NEON:
//! 6 × 16, 12 ymm / 24 q-register accumulators).
//! - forward, `y = x·Wᵀ`: `a` = MR rows of x, the panel = NR decoded rows of W, transposed;
//! - backward, `dx = dy·W`: `a` = MR rows of dy, the panel = NR decoded columns of W.
//!
//! In both the panel is the decoded W, reused by every MR rows of activations while it is in cache.
//! The forward's panel is W's rows transposed: each level decodes a block of rows into registers
//! and transposes it there (AVX-512 16 × 16, AVX2 8 × 8, NEON 4 × 4) before storing it.

use super::simd::CpuLevel;
use crate::ops::cpu::Shared;
use rayon::prelude::*;
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The largest MR × NR of any level (the accumulator tile's size).
const TILE: usize = 12 * 32;

/// NF4 codes as a flat view: `words` little-endian u32 (8 codes each, the first in the high
/// nibble of byte 0), one absmax per `blocksize` values.
pub struct Codes<'a> {
    pub words: Words<'a>,
    pub absmax: Absmax<'a>,
    pub blocksize: usize,
}

impl Codes<'_> {
    /// The absmax of the block holding flat index `f`. Block sizes are powers of two
    /// ([`crate::quant::nf4::check_blocksize`]): a shift, not a 64-bit division (tens of cycles,
    /// once per run of 8 or 16 decoded values).
    #[inline(always)]
    pub fn scale(&self, f: usize) -> f32 {
        self.absmax.get(f >> self.blocksize.trailing_zeros())
    }
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

/// One level's register-blocked product and decoder.
trait Kernel {
    const MR: usize;
    const NR: usize;
    /// `acc[r·NR + c] = Σ_p a[r·lda + p] · panel[p·NR + c]` for r < rows (rows ≤ MR), p < depth.
    ///
    /// SAFETY: the CPU has the level's features; `a` holds `rows` rows of `depth` at stride
    /// `lda`; the panel holds `depth × NR` values.
    unsafe fn kernel(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]);
    /// Decodes `len` values (a multiple of NR) from flat index `at` (a multiple of NR) into `out`.
    ///
    /// SAFETY: the CPU has the level's features; the run lies inside W and `out`.
    unsafe fn decode_run(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
        decode_portable(w, at, len, Self::NR, out)
    }
    /// Decodes rows `j0..j0+cols` of W (cols ≤ NR) into `panel` k-major: `panel[p·NR + c] =
    /// W[j0 + c][p]`, columns past `cols` zero.
    ///
    /// SAFETY: the CPU has the level's features; the rows lie inside W; `panel` holds k × NR.
    unsafe fn decode_panel(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
        decode_panel_with(j0, cols, k, Self::NR, panel, |at, run| Self::decode_run(w, at, run.len(), run))
    }
}

/// Whether this machine's level and these shapes take the fused path: a level with a kernel,
/// rows of W in whole NR-value runs, each run inside one absmax block.
pub fn supported(in_features: usize, blocksize: usize) -> bool {
    supported_at(CpuLevel::current(), in_features, blocksize)
}

/// [`supported`] at a given level (tests run every level the machine has).
pub fn supported_at(level: CpuLevel, in_features: usize, blocksize: usize) -> bool {
    let nr = match level {
        CpuLevel::Scalar => return false,
        CpuLevel::Avx512 => 32,
        CpuLevel::Avx2 | CpuLevel::Neon => 16,
    };
    CpuLevel::available().contains(&level) && in_features % nr == 0 && blocksize % nr == 0 && blocksize.is_power_of_two()
}

/// `y[m, n] = x[m, k] · Wᵀ`, W `[n, k]` in NF4. Call only where [`supported`] holds.
pub fn matmul_t(x: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    matmul_t_at(CpuLevel::current(), x, m, w, n, k)
}

/// `dx[m, k] = dy[m, n] · W`, W `[n, k]` in NF4. Call only where [`supported`] holds.
pub fn matmul(dy: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    matmul_at(CpuLevel::current(), dy, m, w, n, k)
}

/// [`matmul_t`] at a given level.
pub fn matmul_t_at(level: CpuLevel, x: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    assert!(supported_at(level, k, w.blocksize) && x.len() >= m * k, "no {} NF4 kernel for rows of {k} in blocks of {}", level.name(), w.blocksize);
    match level {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => forward::<Avx512>(x, m, w, n, k),
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => forward::<Avx2>(x, m, w, n, k),
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => forward::<Neon>(x, m, w, n, k),
        _ => unreachable!("supported_at checked the level"),
    }
}

/// [`matmul`] at a given level.
pub fn matmul_at(level: CpuLevel, dy: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    assert!(supported_at(level, k, w.blocksize) && dy.len() >= m * n, "no {} NF4 kernel for rows of {k} in blocks of {}", level.name(), w.blocksize);
    match level {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512 => backward::<Avx512>(dy, m, w, n, k),
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => backward::<Avx2>(dy, m, w, n, k),
        #[cfg(target_arch = "aarch64")]
        CpuLevel::Neon => backward::<Neon>(dy, m, w, n, k),
        _ => unreachable!("supported_at checked the level"),
    }
}

#[allow(dead_code)]
fn forward<K: Kernel>(x: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    let (mr, nr) = (K::MR, K::NR);
    // The panel (NR rows of W, decoded and stored k-major) is the operand the kernel reuses, as
    // in `backward`: it stays in cache while every MR rows of x stream past it. (The other way
    // round, W rows against panels of x, read all of x from outside the cache for each MR rows
    // of W: half the speed at SmolLM2's shapes.)
    let panels = n.div_ceil(nr);
    let row_tiles = m.div_ceil(mr);
    // Rows are split too where there are too few panels to keep every thread busy.
    let splits = (4 * rayon::current_num_threads()).div_ceil(panels).clamp(1, row_tiles);
    let per_split = row_tiles.div_ceil(splits);
    let mut y = vec![0f32; m * n];
    let out = Shared(y.as_mut_ptr());
    (0..panels * splits).into_par_iter().for_each_init(
        || vec![0f32; k * nr],
        |panel, task| {
            let (q, split) = (task / splits, task % splits);
            let j0 = q * nr;
            let cols = nr.min(n - j0);
            // SAFETY: the level was checked by `supported_at`; rows j0..j0+cols are inside W.
            unsafe { K::decode_panel(w, j0, cols, k, panel) };
            let mut acc = [0f32; TILE];
            for t in split * per_split..((split + 1) * per_split).min(row_tiles) {
                let (i0, rows) = (t * mr, mr.min(m - t * mr));
                // SAFETY: x rows i0.. hold k values each; the panel holds k × NR.
                unsafe { K::kernel(k, x[i0 * k..].as_ptr(), k, rows, panel.as_ptr(), &mut acc) };
                for r in 0..rows {
                    // SAFETY: row i0+r, columns j0..j0+cols are inside y; tasks write disjoint blocks.
                    unsafe { std::ptr::copy_nonoverlapping(acc[r * nr..].as_ptr(), out.at((i0 + r) * n + j0), cols) };
                }
            }
        },
    );
    y
}

#[allow(dead_code)]
fn backward<K: Kernel>(dy: &[f32], m: usize, w: &Codes, n: usize, k: usize) -> Vec<f32> {
    let (mr, nr) = (K::MR, K::NR);
    let mut dx = vec![0f32; m * k];
    let out = Shared(dx.as_mut_ptr());
    (0..k / nr).into_par_iter().for_each_init(
        || vec![0f32; n * nr],
        |panel, q| {
            let k0 = q * nr;
            for j in 0..n {
                // SAFETY: the level was checked; the run is inside row j of W.
                unsafe { K::decode_run(w, j * k + k0, nr, &mut panel[j * nr..(j + 1) * nr]) };
            }
            let mut acc = [0f32; TILE];
            for i0 in (0..m).step_by(mr) {
                let rows = mr.min(m - i0);
                // SAFETY: dy rows i0.. hold n values each; the panel holds n × NR.
                unsafe { K::kernel(n, dy[i0 * n..].as_ptr(), n, rows, panel.as_ptr(), &mut acc) };
                for r in 0..rows {
                    // SAFETY: row i0+r, columns k0..k0+NR are inside dx; panels write disjoint columns.
                    unsafe { std::ptr::copy_nonoverlapping(acc[r * nr..].as_ptr(), out.at((i0 + r) * k + k0), nr) };
                }
            }
        },
    );
    dx
}

/// Decodes `len` values from flat index `at`, a run of `nr` (inside one absmax block) at a time:
/// byte b of a word holds values 2b (high nibble) and 2b+1 (low).
#[allow(dead_code)]
fn decode_portable(w: &Codes, at: usize, len: usize, nr: usize, out: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    for run in 0..len / nr {
        let f = at + run * nr;
        let scale = w.scale(f);
        let out = &mut out[run * nr..(run + 1) * nr];
        for (i, o) in out.chunks_exact_mut(8).enumerate() {
            let word = w.words.word(f / 8 + i);
            for b in 0..4 {
                let byte = (word >> (8 * b)) & 255;
                o[2 * b] = NF4_CODE[(byte >> 4) as usize] * scale;
                o[2 * b + 1] = NF4_CODE[(byte & 15) as usize] * scale;
            }
        }
    }
}

/// [`Kernel::decode_panel`] a run of NR values at a time, each scattered down its column.
fn decode_panel_with(j0: usize, cols: usize, k: usize, nr: usize, panel: &mut [f32], decode_run: impl Fn(usize, &mut [f32])) {
    let mut run = [0f32; 32];
    let run = &mut run[..nr];
    for c in 0..nr {
        for p0 in (0..k).step_by(nr) {
            if c < cols {
                decode_run((j0 + c) * k + p0, run);
            } else {
                run.fill(0.0);
            }
            for (i, &v) in run.iter().enumerate() {
                panel[(p0 + i) * nr + c] = v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx512 {
    const MR: usize = 12;
    const NR: usize = 32;

    #[inline]
    unsafe fn kernel(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
        kernel_avx512(depth, a, lda, rows, panel, acc)
    }

    #[inline]
    unsafe fn decode_run(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
        decode_run_avx512(w, at, len, out)
    }

    #[inline]
    unsafe fn decode_panel(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
        decode_panel_avx512(w, j0, cols, k, panel)
    }
}

/// One row's 16 codes from two words as 16 floats, `code × scale`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn decode_words_avx512(words: [u32; 2], scale: f32, table: __m512) -> __m512 {
    // Lane 2b reads byte b's high nibble, lane 2b+1 its low one; vpermps uses the low 4 bits.
    const SHIFTS: [i32; 16] = [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0];
    let bytes = _mm_set_epi32(0, 0, words[1] as i32, words[0] as i32);
    let idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), _mm512_loadu_si512(SHIFTS.as_ptr().cast()));
    _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(scale))
}

/// [`Kernel::decode_panel`] 16 rows × 16 values at a time, transposed 16 × 16 in registers
/// (pairs within 128-bit lanes, then lanes across registers), stored as 16 panel half-rows, where
/// the portable decoder stores each value alone, one cache line apart from the next.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_panel_avx512(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    let table = _mm512_loadu_ps(NF4_CODE.as_ptr());
    for p0 in (0..k).step_by(16) {
        for half in 0..2 {
            let r: [__m512; 16] = std::array::from_fn(|i| {
                let c = half * 16 + i;
                if c < cols {
                    let f = (j0 + c) * k + p0;
                    decode_words_avx512([w.words.word(f / 8).to_le(), w.words.word(f / 8 + 1).to_le()], w.scale(f), table)
                } else {
                    _mm512_setzero_ps()
                }
            });
            let t: [__m512; 16] = std::array::from_fn(|i| {
                let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                if i % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) }
            });
            // s[4g + q]: in 128-bit lane L, column 4L + q of rows 4g..4g+4.
            let s: [__m512; 16] = std::array::from_fn(|i| {
                let (g, q) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + (q / 2)], t[4 * g + 2 + (q / 2)]);
                if q % 2 == 0 { _mm512_shuffle_ps::<0x44>(a, b) } else { _mm512_shuffle_ps::<0xEE>(a, b) }
            });
            let out = panel.as_mut_ptr().add(half * 16);
            for q in 0..4 {
                // Column 4L + q is lane L of s[q], s[4 + q], s[8 + q], s[12 + q]: a 4 × 4 transpose of lanes.
                let u0 = _mm512_shuffle_f32x4::<0x44>(s[q], s[4 + q]);
                let u1 = _mm512_shuffle_f32x4::<0xEE>(s[q], s[4 + q]);
                let v0 = _mm512_shuffle_f32x4::<0x44>(s[8 + q], s[12 + q]);
                let v1 = _mm512_shuffle_f32x4::<0xEE>(s[8 + q], s[12 + q]);
                _mm512_storeu_ps(out.add((p0 + q) * 32), _mm512_shuffle_f32x4::<0x88>(u0, v0));
                _mm512_storeu_ps(out.add((p0 + 4 + q) * 32), _mm512_shuffle_f32x4::<0xDD>(u0, v0));
                _mm512_storeu_ps(out.add((p0 + 8 + q) * 32), _mm512_shuffle_f32x4::<0x88>(u1, v1));
                _mm512_storeu_ps(out.add((p0 + 12 + q) * 32), _mm512_shuffle_f32x4::<0xDD>(u1, v1));
            }
        }
    }
}

/// Decodes 32 values per step: a 16-entry table lookup is one `vpermps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_run_avx512(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    let table = _mm512_loadu_ps(NF4_CODE.as_ptr());
    // Lane 2b reads byte b's high nibble, lane 2b+1 its low one; vpermps uses the low 4 bits.
    const SHIFTS: [i32; 16] = [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0];
    let shifts = _mm512_loadu_si512(SHIFTS.as_ptr().cast());
    for run in 0..len / 32 {
        let f = at + run * 32;
        let word = f / 8;
        let bytes: [u32; 4] = std::array::from_fn(|i| w.words.word(word + i).to_le());
        let bytes = _mm_loadu_si128(bytes.as_ptr().cast());
        let scale = _mm512_set1_ps(w.scale(f));
        for (half, doubled) in [_mm_unpacklo_epi8(bytes, bytes), _mm_unpackhi_epi8(bytes, bytes)].into_iter().enumerate() {
            let idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(doubled), shifts);
            let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), scale);
            _mm512_storeu_ps(out.as_mut_ptr().add(run * 32 + half * 16), v);
        }
    }
}

/// 12 rows × 32 columns in 24 zmm accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
    const MR: usize = 12;
    // Missing rows repeat the last one: same work, results not stored.
    let row: [*const f32; MR] = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
    let mut c = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..depth {
        let b0 = _mm512_loadu_ps(panel.add(p * 32));
        let b1 = _mm512_loadu_ps(panel.add(p * 32 + 16));
        for r in 0..MR {
            let v = _mm512_set1_ps(*row[r].add(p));
            c[r][0] = _mm512_fmadd_ps(v, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(v, b1, c[r][1]);
        }
    }
    for r in 0..MR {
        _mm512_storeu_ps(acc.as_mut_ptr().add(r * 32), c[r][0]);
        _mm512_storeu_ps(acc.as_mut_ptr().add(r * 32 + 16), c[r][1]);
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;

    #[inline]
    unsafe fn kernel(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
        kernel_avx2(depth, a, lda, rows, panel, acc)
    }

    #[inline]
    unsafe fn decode_run(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
        decode_run_avx2(w, at, len, out)
    }

    #[inline]
    unsafe fn decode_panel(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
        decode_panel_avx2(w, j0, cols, k, panel)
    }
}

/// One word's 8 codes as 8 floats, `code × scale`: lane 2b reads byte b's high nibble, lane
/// 2b+1 its low one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode_word_avx2(word: u32, scale: f32, (lo, hi): (__m256, __m256)) -> __m256 {
    let shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    let (fifteen, eight) = (_mm256_set1_epi32(15), _mm256_set1_epi32(8));
    let doubled = _mm_unpacklo_epi8(_mm_cvtsi32_si128(word as i32), _mm_cvtsi32_si128(word as i32));
    let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(doubled), shifts), fifteen);
    let top = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(idx, eight), eight));
    let v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), top);
    _mm256_mul_ps(v, _mm256_set1_ps(scale))
}

/// [`Kernel::decode_panel`] 8 rows × 8 values at a time: each row's word decoded into a
/// register, the 8 × 8 block transposed in registers, stored as 8 panel rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_panel_avx2(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    let table = (_mm256_loadu_ps(NF4_CODE.as_ptr()), _mm256_loadu_ps(NF4_CODE.as_ptr().add(8)));
    for p0 in (0..k).step_by(8) {
        for half in 0..2 {
            let r: [__m256; 8] = std::array::from_fn(|i| {
                let c = half * 8 + i;
                if c < cols {
                    let f = (j0 + c) * k + p0;
                    decode_word_avx2(w.words.word(f / 8).to_le(), w.scale(f), table)
                } else {
                    _mm256_setzero_ps()
                }
            });
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
            });
            // s[4g + q]: column q (low lane) / q + 4 (high lane) of rows 4g..4g+4.
            let s: [__m256; 8] = std::array::from_fn(|i| {
                let (g, q) = (i / 4, i % 4);
                let (a, b) = (t[4 * g + (q / 2)], t[4 * g + 2 + (q / 2)]);
                if q % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
            });
            for q in 0..4 {
                let out = panel.as_mut_ptr().add(half * 8);
                _mm256_storeu_ps(out.add((p0 + q) * 16), _mm256_permute2f128_ps::<0x20>(s[q], s[4 + q]));
                _mm256_storeu_ps(out.add((p0 + q + 4) * 16), _mm256_permute2f128_ps::<0x31>(s[q], s[4 + q]));
            }
        }
    }
}

/// Decodes 16 values per step: the 16-entry table is two 8-entry `vpermps` lookups blended on
/// the code's top bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_run_avx2(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
    use crate::quant::nf4::NF4_CODE;
    let table = (_mm256_loadu_ps(NF4_CODE.as_ptr()), _mm256_loadu_ps(NF4_CODE.as_ptr().add(8)));
    for run in 0..len / 16 {
        let f = at + run * 16;
        let scale = w.scale(f);
        for half in 0..2 {
            let v = decode_word_avx2(w.words.word(f / 8 + half).to_le(), scale, table);
            _mm256_storeu_ps(out.as_mut_ptr().add(run * 16 + half * 8), v);
        }
    }
}

/// 6 rows × 16 columns in 12 ymm accumulators (of 16 registers: two panel loads, one broadcast).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
    const MR: usize = 6;
    let row: [*const f32; MR] = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..depth {
        let b0 = _mm256_loadu_ps(panel.add(p * 16));
        let b1 = _mm256_loadu_ps(panel.add(p * 16 + 8));
        for r in 0..MR {
            let v = _mm256_broadcast_ss(&*row[r].add(p));
            c[r][0] = _mm256_fmadd_ps(v, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(v, b1, c[r][1]);
        }
    }
    for r in 0..MR {
        _mm256_storeu_ps(acc.as_mut_ptr().add(r * 16), c[r][0]);
        _mm256_storeu_ps(acc.as_mut_ptr().add(r * 16 + 8), c[r][1]);
    }
}

#[cfg(target_arch = "aarch64")]
struct Neon;

#[cfg(target_arch = "aarch64")]
impl Kernel for Neon {
    const MR: usize = 6;
    const NR: usize = 16;

    #[inline]
    unsafe fn kernel(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
        kernel_neon(depth, a, lda, rows, panel, acc)
    }

    #[inline]
    unsafe fn decode_run(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
        decode_run_neon(w, at, len, out)
    }

    #[inline]
    unsafe fn decode_panel(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
        decode_panel_neon(w, j0, cols, k, panel)
    }
}

/// NF4's 16 floats as 64 table bytes for `vqtbl4q_u8` (aarch64 is little-endian: byte 4c + i
/// of the table is byte i of code c's float).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn nf4_table_neon() -> uint8x16x4_t {
    let bytes = crate::quant::nf4::NF4_CODE.as_ptr().cast::<u8>();
    uint8x16x4_t(vld1q_u8(bytes), vld1q_u8(bytes.add(16)), vld1q_u8(bytes.add(32)), vld1q_u8(bytes.add(48)))
}

/// One word's 8 codes as two registers of 4 floats, `code × scale`: value 2b is byte b's high
/// nibble, 2b+1 its low one. Each float is gathered byte by byte from the table (`vqtbl4q_u8`:
/// byte 4·code + i).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn decode_word_neon(word: u32, scale: f32, table: uint8x16x4_t) -> [float32x4_t; 2] {
    const SHIFTS: [i8; 8] = [-4, 0, -4, 0, -4, 0, -4, 0];
    const SPREAD: [[u8; 16]; 2] = [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7]];
    const BYTE: [u8; 16] = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3];
    let bytes = vcreate_u8(word as u64);
    let doubled = vzip1_u8(bytes, bytes);
    let codes = vand_u8(vshl_u8(doubled, vld1_s8(SHIFTS.as_ptr())), vdup_n_u8(15));
    let quads = vcombine_u8(vshl_n_u8::<2>(codes), vdup_n_u8(0));
    let byte = vld1q_u8(BYTE.as_ptr());
    SPREAD.map(|spread| {
        let idx = vaddq_u8(vqtbl1q_u8(quads, vld1q_u8(spread.as_ptr())), byte);
        vmulq_n_f32(vreinterpretq_f32_u8(vqtbl4q_u8(table, idx)), scale)
    })
}

/// Decodes 16 values (two words) per step.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn decode_run_neon(w: &Codes, at: usize, len: usize, out: &mut [f32]) {
    let table = nf4_table_neon();
    for run in 0..len / 16 {
        let f = at + run * 16;
        let scale = w.scale(f);
        for half in 0..2 {
            let v = decode_word_neon(w.words.word(f / 8 + half).to_le(), scale, table);
            vst1q_f32(out.as_mut_ptr().add(run * 16 + half * 8), v[0]);
            vst1q_f32(out.as_mut_ptr().add(run * 16 + half * 8 + 4), v[1]);
        }
    }
}

/// [`Kernel::decode_panel`] 4 rows × 4 values at a time: each row's words decoded into
/// registers, each 4 × 4 block transposed in registers and stored as 4 panel rows.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn decode_panel_neon(w: &Codes, j0: usize, cols: usize, k: usize, panel: &mut [f32]) {
    let table = nf4_table_neon();
    let (f32x2, x2f32) = (|v: float32x4_t| vreinterpretq_f64_f32(v), |v: float64x2_t| vreinterpretq_f32_f64(v));
    for p0 in (0..k).step_by(8) {
        for g in 0..4 {
            // r[i][h]: values p0 + 4h .. p0 + 4h + 4 of row j0 + 4g + i.
            let r: [[float32x4_t; 2]; 4] = std::array::from_fn(|i| {
                let c = 4 * g + i;
                if c < cols {
                    let f = (j0 + c) * k + p0;
                    decode_word_neon(w.words.word(f / 8).to_le(), w.scale(f), table)
                } else {
                    [vdupq_n_f32(0.0); 2]
                }
            });
            for h in 0..2 {
                let (t0, t1) = (vtrn1q_f32(r[0][h], r[1][h]), vtrn2q_f32(r[0][h], r[1][h]));
                let (t2, t3) = (vtrn1q_f32(r[2][h], r[3][h]), vtrn2q_f32(r[2][h], r[3][h]));
                let columns = [
                    x2f32(vtrn1q_f64(f32x2(t0), f32x2(t2))),
                    x2f32(vtrn1q_f64(f32x2(t1), f32x2(t3))),
                    x2f32(vtrn2q_f64(f32x2(t0), f32x2(t2))),
                    x2f32(vtrn2q_f64(f32x2(t1), f32x2(t3))),
                ];
                for (q, v) in columns.into_iter().enumerate() {
                    vst1q_f32(panel.as_mut_ptr().add((p0 + 4 * h + q) * 16 + 4 * g), v);
                }
            }
        }
    }
}

/// 6 rows × 16 columns in 24 q-register accumulators (of 32: four panel loads, one scalar).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn kernel_neon(depth: usize, a: *const f32, lda: usize, rows: usize, panel: *const f32, acc: &mut [f32; TILE]) {
    const MR: usize = 6;
    let row: [*const f32; MR] = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
    let mut c = [[vdupq_n_f32(0.0); 4]; MR];
    for p in 0..depth {
        let b = [0, 4, 8, 12].map(|o| vld1q_f32(panel.add(p * 16 + o)));
        for r in 0..MR {
            let v = *row[r].add(p);
            for q in 0..4 {
                c[r][q] = vfmaq_n_f32(c[r][q], b[q], v);
            }
        }
    }
    for r in 0..MR {
        for q in 0..4 {
            vst1q_f32(acc.as_mut_ptr().add(r * 16 + q * 4), c[r][q]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable panel decoder and AVX2's, NEON's and AVX-512's give the same panel, with
    /// partial panels and absmax blocks that straddle rows (k = 80 or 96, blocks of 64).
    #[test]
    fn panel_decoders_agree() {
        let (n, k, blocksize): (usize, usize, usize) = (13, 80, 64);
        let words: Vec<i32> = (0..n * k / 8).map(|i| (i as u32).wrapping_mul(2654435761) as i32).collect();
        let absmax: Vec<f32> = (0..(n * k).div_ceil(blocksize)).map(|b| 0.5 + b as f32 / 7.0).collect();
        let w = Codes { words: Words::I32(&words), absmax: Absmax::Plain(&absmax), blocksize };
        for (j0, cols) in [(0, 13), (0, 16.min(n)), (5, 8)] {
            let cols = cols.min(n - j0);
            let mut portable = vec![f32::NAN; k * 16];
            decode_panel_with(j0, cols, k, 16, &mut portable, |at, run| decode_portable(&w, at, run.len(), 16, run));
            for c in 0..16 {
                for p in 0..k {
                    let want = if c < cols { let f = (j0 + c) * k + p; let mut v = [0f32; 16]; decode_portable(&w, f - f % 16, 16, 16, &mut v); v[f % 16] } else { 0.0 };
                    assert_eq!(portable[p * 16 + c].to_bits(), want.to_bits(), "row {c}, column {p}");
                }
            }
            #[cfg(target_arch = "aarch64")]
            if CpuLevel::available().contains(&CpuLevel::Neon) {
                let mut neon = vec![f32::NAN; k * 16];
                // SAFETY: the CPU has NEON; rows j0..j0+cols are inside W.
                unsafe { decode_panel_neon(&w, j0, cols, k, &mut neon) };
                assert!(neon.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "NEON panel differs at j0 {j0}, cols {cols}");
                for at in (0..n * k).step_by(16) {
                    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
                    decode_portable(&w, at, 16, 16, &mut a);
                    // SAFETY: as above; the run lies inside W.
                    unsafe { decode_run_neon(&w, at, 16, &mut b) };
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "NEON run differs at {at}");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if CpuLevel::available().contains(&CpuLevel::Avx2) {
                let mut avx2 = vec![f32::NAN; k * 16];
                // SAFETY: the CPU has AVX2 and FMA; rows j0..j0+cols are inside W.
                unsafe { decode_panel_avx2(&w, j0, cols, k, &mut avx2) };
                assert!(avx2.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "AVX2 panel differs at j0 {j0}, cols {cols}");
            }
        }
        // AVX-512's panels are 32 wide: rows of 96 values, blocks of 64 still straddling rows.
        #[cfg(target_arch = "x86_64")]
        if CpuLevel::available().contains(&CpuLevel::Avx512) {
            let (n, k): (usize, usize) = (37, 96);
            let words: Vec<i32> = (0..n * k / 8).map(|i| (i as u32).wrapping_mul(2246822519) as i32).collect();
            let absmax: Vec<f32> = (0..(n * k).div_ceil(blocksize)).map(|b| 0.25 + b as f32 / 3.0).collect();
            let w = Codes { words: Words::I32(&words), absmax: Absmax::Plain(&absmax), blocksize };
            for (j0, cols) in [(0, 32), (32, 5), (3, 17)] {
                let mut portable = vec![f32::NAN; k * 32];
                decode_panel_with(j0, cols, k, 32, &mut portable, |at, run| decode_portable(&w, at, run.len(), 32, run));
                let mut avx512 = vec![f32::NAN; k * 32];
                // SAFETY: the CPU has AVX-512F; rows j0..j0+cols are inside W.
                unsafe { decode_panel_avx512(&w, j0, cols, k, &mut avx512) };
                assert!(avx512.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "AVX-512 panel differs at j0 {j0}, cols {cols}");
            }
        }
    }
}
