//! Rotary position embeddings: inverse frequencies for each scaling scheme and the cos/sin
//! tables, computed on the host in f32 the way transformers does.

use super::config::{Config, Rope};

/// Inverse frequencies for a sequence of `seq_len` positions, and the factor that scales cos/sin.
pub fn inv_freq(cfg: &Config, seq_len: usize) -> (Vec<f32>, f32) {
    let dim = cfg.rotary_dim();
    let base = cfg.rope_theta as f32;
    let exponent = |i: usize| (2 * i) as f32 / dim as f32;
    let plain: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf(exponent(i))).collect();
    match &cfg.rope {
        Rope::Default => (plain, 1.0),
        Rope::Linear { factor } => (plain.iter().map(|f| f / *factor as f32).collect(), 1.0),
        // As llama.cpp applies them: the angle's base frequency divided by the stored f32 factor.
        Rope::Divisors(d) => (plain.iter().zip(d).map(|(f, d)| f / *d as f32).collect(), 1.0),
        Rope::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            let scaled = plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let f_llama = if wavelen > low_wavelen { f / factor } else { f };
                    let is_medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if is_medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f_llama / factor + smooth * f_llama
                    } else {
                        f_llama
                    }
                })
                .collect();
            (scaled, 1.0)
        }
        Rope::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
            // One set of factors for the whole sequence, chosen by its length.
            let ext = if seq_len > *original_max_position_embeddings { long_factor } else { short_factor };
            let f = (0..dim / 2).map(|i| 1.0 / (ext[i] as f32 * base.powf(exponent(i)))).collect();
            (f, *attention_factor as f32)
        }
    }
}

/// cos and sin tables, each `[seq_len, rotary_dim]` row-major, for positions `0..seq_len`.
/// As in transformers, the two halves of a row repeat the same frequencies.
pub fn cos_sin(cfg: &Config, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
    cos_sin_range(cfg, seq_len, 0..seq_len)
}

/// The rows `positions` of [`cos_sin`]`(cfg, seq_len)`, computed alone.
pub fn cos_sin_range(cfg: &Config, seq_len: usize, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
    let (freqs, scale) = inv_freq(cfg, seq_len);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for pos in positions {
        for _ in 0..2 {
            for f in &freqs {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
    }
    (cos, sin)
}
