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
