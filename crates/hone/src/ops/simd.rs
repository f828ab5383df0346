//! The CPU's vector level, detected at run time, which picks the CPU kernels (see
//! [`super::nf4_gemm`]). `HONE_CPU_LEVEL` (scalar, avx2, avx512, neon) forces a level the
//! machine can run, so that one machine tests every level it has.

use std::sync::OnceLock;

/// Vector instruction levels hone has kernels for, lowest first on each architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLevel {
    /// No hone kernel: dequantize chunks of rows and call the GEMM library.
    Scalar,
    /// x86-64 with AVX2 and FMA (8 f32 lanes).
    Avx2,
    /// x86-64 with AVX-512F (16 f32 lanes).
    Avx512,
    /// aarch64 Advanced SIMD (4 f32 lanes, 32 registers).
    Neon,
}

impl CpuLevel {
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512 => "avx512",
            CpuLevel::Neon => "neon",
        }
    }

    /// f32 lanes of one vector register at this level.
    pub fn lanes(self) -> usize {
        match self {
            CpuLevel::Scalar => 1,
            CpuLevel::Avx2 => 8,
            CpuLevel::Avx512 => 16,
            CpuLevel::Neon => 4,
        }
    }

    /// Every level this machine runs, lowest first.
    pub fn available() -> Vec<CpuLevel> {
        let mut levels = vec![CpuLevel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                levels.push(CpuLevel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                levels.push(CpuLevel::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                levels.push(CpuLevel::Neon);
            }
        }
        levels
    }

    /// The level named by `HONE_CPU_LEVEL`, or the best one this machine runs.
    pub fn from_env() -> Result<CpuLevel, String> {
        let available = Self::available();
        let best = *available.last().expect("scalar is always available");
        let Ok(name) = std::env::var("HONE_CPU_LEVEL") else { return Ok(best) };
        let names: Vec<&str> = available.iter().map(|l| l.name()).collect();
        match available.iter().find(|l| l.name() == name.trim().to_ascii_lowercase()) {
            Some(&level) => Ok(level),
            None => Err(format!("HONE_CPU_LEVEL={name}: this machine runs {} (the best, {}, is the default)", names.join(", "), best.name())),
        }
    }

    /// The level every CPU kernel uses in this process, fixed at first use.
    pub fn current() -> CpuLevel {
        static LEVEL: OnceLock<CpuLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| Self::from_env().unwrap_or_else(|e| panic!("{e}")))
    }
}

/// `Σ a[i]·b[i]` at [`CpuLevel::current`]: the product of a weight row with one token's
/// activations in generation (a GEMV, one weight read per multiply-add). The portable loop
/// keeps 8 partial sums, which baseline x86-64 code runs as SSE multiply then add behind one
/// add's latency; with FMA and four independent vector sums the row streams at memory speed.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_level(CpuLevel::current(), a, b)
}

/// [`dot`] at `level`, which must be one of [`CpuLevel::available`] (for tests of every level).
pub fn dot_at(level: CpuLevel, a: &[f32], b: &[f32]) -> f32 {
    assert!(CpuLevel::available().contains(&level), "{} is not available on this CPU", level.name());
    dot_level(level, a, b)
}

fn dot_level(level: CpuLevel, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: the level is only chosen where the CPU has these features.
        CpuLevel::Avx512 => return unsafe { dot_avx512(a, b) },
        CpuLevel::Avx2 => return unsafe { dot_avx2(a, b) },
        _ => {}
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len() / 64 * 64;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16·j + 16 <= n <= len.
            *s = unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16 * j)), _mm512_loadu_ps(pb.add(i + 16 * j)), *s) };
        }
        i += 64;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum) + dot_portable(&a[n..], &b[n..])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len() / 32 * 32;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8·j + 8 <= n <= len.
            *s = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *s) };
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + dot_portable(&a[n..], &b[n..])
}
