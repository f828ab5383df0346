//! PEFT's PiSSA initialisation (`init_lora_weights="pissa"`): A and B from the r principal
//! singular triplets of the base weight, `A = √(S_r/s)·V_rᵀ`, `B = U_r·√(S_r/s)`, so that
//! `s·B·A` is W's best rank-r part and the base becomes the residual `W − s·B·A` (the model
//! starts where the base was). Saved for users converted to a plain LoRA of rank 2r on the
//! original base, as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)`:
//! `ΔW = s·(B·A − B₀·A₀) = s·[B | −B₀]·[A ; A₀]`, alpha doubled (√2·alpha with rsLoRA) so the
//! scale stays.
//!
//! And LoftQ for QLoRA, as PEFT's `replace_lora_weights_loftq`: A and B from the SVD of the
//! NF4 quantization error `W − deq(NF4(W))`, `A = √S_r·V_rᵀ`, `B = U_r·√S_r` (PEFT does not
//! divide by the scale here, so the start is `deq(NF4(W)) + s·(error)_r`: nearest W at s = 1),
//! the base left as `NF4(W)`.

use super::peft::{Adapter, HostLora};
use crate::error::{Error, Result};

/// How fresh adapters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Init {
    /// PEFT's default: A kaiming-uniform, B zero.
    #[default]
    Default,
    Pissa,
    /// LoftQ, one alternation (PEFT's `replace_lora_weights_loftq`); QLoRA only.
    Loftq,
}

impl Init {
    /// The name `--init` takes.
    pub fn name(self) -> &'static str {
        match self {
            Init::Default => "default",
            Init::Pissa => "pissa",
            Init::Loftq => "loftq",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "default" | "lora" => Some(Init::Default),
            "pissa" => Some(Init::Pissa),
            "loftq" => Some(Init::Loftq),
            _ => None,
        }
    }
}

/// PiSSA's A `[r, in]` and B `[out, r]` of `w` (`[out, in]`, row-major): the r principal
/// singular triplets, `A = √(S_r/scaling)·V_rᵀ`, `B = U_r·√(S_r/scaling)`; the SVD in f64.
pub fn pissa(w: &[f32], out: usize, inp: usize, r: usize, scaling: f64) -> std::result::Result<(Vec<f32>, Vec<f32>), String> {
    let k = out.min(inp);
    if r > k {
        return Err(format!("rank {r} is more than the {k} singular values of a [{out}, {inp}] weight"));
    }
    let m = faer::Mat::<f64>::from_fn(out, inp, |i, j| f64::from(w[i * inp + j]));
    let svd = m.thin_svd().map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
    let root: Vec<f64> = (0..r).map(|c| (s[c] / scaling).sqrt()).collect();
    let a = (0..r).flat_map(|c| (0..inp).map(move |j| (c, j))).map(|(c, j)| (root[c] * v[(j, c)]) as f32).collect();
    let b = (0..out).flat_map(|i| (0..r).map(move |c| (i, c))).map(|(i, c)| (u[(i, c)] * root[c]) as f32).collect();
    Ok((a, b))
}

/// LoftQ's A `[r, in]` and B `[out, r]` for `w` (`[out, in]`) and the quantization error they
/// are made from, `w − deq(NF4(w))`, NF4 as the loader quantizes (bitsandbytes' bits).
pub fn loftq(w: &[f32], shape: &[usize], r: usize, blocksize: usize, double_quant: bool) -> std::result::Result<((Vec<f32>, Vec<f32>), Vec<f32>), String> {
    let q = crate::quant::nf4::Nf4Tensor::quantize(w, shape, blocksize, double_quant)?;
    let error: Vec<f32> = w.iter().zip(q.dequantize()).map(|(w, d)| w - d).collect();
    Ok((pissa(&error, shape[0], shape[1], r, 1.0)?, error))
}

/// `w − s·B·A` in place: the residual PiSSA leaves as the base (f32, as PEFT computes it).
pub fn subtract(w: &mut [f32], layer: &HostLora, scaling: f64) {
    for (w, d) in w.iter_mut().zip(layer.delta(scaling)) {
        *w -= d;
    }
}

impl Adapter {
    /// The adapter as a plain LoRA for the original base, from one trained on PiSSA's residual
    /// base that started at `initial` (PEFT's `subtract_mutated_init`): rank 2r, A = [A ; A₀],
    /// B = [B | −B₀], alpha doubled (√2·alpha with rsLoRA).
    pub fn with_initial_subtracted(&self, initial: &Adapter) -> Result<Adapter> {
        if self.use_dora {
            return Err(Error::unsupported(&self.source, "converting a DoRA adapter trained from PiSSA"));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let l0 = initial
                .layers
                .iter()
                .find(|i| i.module == l.module && i.a_shape == l.a_shape && i.b_shape == l.b_shape)
                .ok_or_else(|| Error::tensor(&initial.source, &l.module, "no initial A/B of this module and shape to subtract"))?;
            let [out, r] = l.b_shape;
            let mut a = l.a.clone();
            a.extend_from_slice(&l0.a);
            let b = (0..out).flat_map(|i| l.b[i * r..(i + 1) * r].iter().copied().chain(l0.b[i * r..(i + 1) * r].iter().map(|v| -v))).collect();
            layers.push(HostLora { module: l.module.clone(), a, a_shape: [2 * r, l.a_shape[1]], b, b_shape: [out, 2 * r], magnitude: None });
        }
        Ok(Adapter {
            r: 2 * self.r,
            alpha: if self.use_rslora { self.alpha * std::f64::consts::SQRT_2 } else { 2.0 * self.alpha },
            layers,
            pissa: false,
            ..self.clone()
        })
    }
}
