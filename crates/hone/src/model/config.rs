//! `config.json` as Hugging Face writes it. Field names are HF's. Both transformers 4.x
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) are read
//! into one normalised [`Config`].

use crate::error::{Error, Result};
use serde::Deserialize;

/// The architectures hone runs. They differ only in the details captured by [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Phi3,
}

impl Arch {
    fn parse(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "phi3" => Arch::Phi3,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rope {
    Default,
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Phi-3 LongRoPE: short factors up to `original_max_position_embeddings`, long beyond.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// One divisor per frequency, as llama.cpp stores a scaling it computed from config.json
    /// (`rope_freqs.weight` in a GGUF file: Llama 3.1's scaling, precomputed by its converter).
    Divisors(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope: Rope,
    /// Fraction of each head's dimensions that are rotated.
    pub partial_rotary_factor: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2, some Llamas) and on o_proj (`attention_bias` Llamas).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Keys only attend to the last `sliding_window` positions, when set.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (informational; hone computes in f32).
    pub dtype: Option<String>,
    /// The checkpoint is pre-quantized in bitsandbytes' 4-bit NF4 layout.
    pub bnb_nf4: bool,
}

/// The raw JSON, every field optional so that a missing one gets a clear message.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<serde_json::Value>,
}

impl Config {
    /// Parses `config.json`; `file` names it in errors.
    pub fn from_json(bytes: &[u8], file: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| Error::format(file, format!("invalid config: {e}")))?;
        let model_type = raw.model_type.clone().ok_or_else(|| Error::format(file, "no `model_type`"))?;
        let arch = Arch::parse(&model_type).ok_or_else(|| {
            Error::unsupported(file, format!("unknown model_type `{model_type}` (hone supports llama, mistral, qwen2, phi3)"))
        })?;
        let need = |v: Option<usize>, name: &str| v.ok_or_else(|| Error::format(file, format!("missing `{name}`")));
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 && raw.head_dim.is_none() {
            return Err(Error::format(file, "hidden_size is not a multiple of num_attention_heads"));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::format(file, "num_attention_heads is not a multiple of num_key_value_heads"));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(Error::unsupported(file, format!("hidden_act `{act}` (hone supports silu)")));
            }
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(2048);
        let (rope_theta, rope, partial) = parse_rope(&raw, max_position_embeddings, file)?;
        let sliding_window = match arch {
            Arch::Qwen2 if raw.use_sliding_window != Some(true) => None,
            Arch::Llama => None,
            _ => raw.sliding_window,
        };
        Ok(Config {
            arch,
            model_type,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: raw.head_dim.unwrap_or(hidden_size / num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings,
            rope_theta,
            rope,
            partial_rotary_factor: partial,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            o_bias: arch != Arch::Qwen2 && raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: raw.bos_token_id.as_ref().and_then(first_id),
            eos_token_ids: ids(raw.eos_token_id.as_ref()),
            dtype: raw.dtype.or(raw.torch_dtype),
            bnb_nf4: parse_quantization(raw.quantization_config.as_ref(), file)?,
        })
    }

    pub fn rotary_dim(&self) -> usize {
        // transformers: int(head_dim * partial_rotary_factor)
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

/// `quantization_config`: hone reads bitsandbytes 4-bit NF4 checkpoints; anything else is
/// refused rather than misread.
fn parse_quantization(q: Option<&serde_json::Value>, file: &str) -> Result<bool> {
    let Some(q) = q.filter(|q| !q.is_null()) else { return Ok(false) };
    let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("?");
    let four_bit = q.get("load_in_4bit").and_then(|v| v.as_bool()) == Some(true);
    let nf4 = q.get("bnb_4bit_quant_type").and_then(|v| v.as_str()) == Some("nf4");
    if method == "bitsandbytes" && four_bit && nf4 {
        Ok(true)
    } else {
        Err(Error::unsupported(file, format!("quantization_config `{method}` (hone reads bitsandbytes 4-bit NF4 checkpoints)")))
    }
}

fn first_id(v: &serde_json::Value) -> Option<u32> {
    ids(Some(v)).first().copied()
}

fn ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|n| n.as_u64().map(|n| n as u32)).collect(),
        _ => vec![],
    }
}

/// RoPE settings from either config style. Returns (theta, scaling, partial_rotary_factor).
fn parse_rope(raw: &Raw, max_pos: usize, file: &str) -> Result<(f64, Rope, f64)> {
    // 5.x: everything in `rope_parameters`; 4.x: `rope_theta` plus optional `rope_scaling`.
    let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()).filter(|v| !v.is_null());
    let get = |k: &str| params.and_then(|p| p.get(k));
    let num = |k: &str| get(k).and_then(|v| v.as_f64());
    let theta = num("rope_theta").or(raw.rope_theta).unwrap_or(10000.0);
    let partial = num("partial_rotary_factor").or(raw.partial_rotary_factor).unwrap_or(1.0);
    let kind = get("rope_type").or_else(|| get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let original = raw
        .original_max_position_embeddings
        .or_else(|| num("original_max_position_embeddings").map(|v| v as usize));
    let factors = |k: &str| -> Result<Vec<f64>> {
        get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .ok_or_else(|| Error::format(file, format!("rope scaling `{kind}` needs `{k}`")))
    };
    let rope = match kind {
        "default" => Rope::Default,
        "linear" => Rope::Linear { factor: num("factor").unwrap_or(1.0) },
        "llama3" => Rope::Llama3 {
            factor: num("factor").unwrap_or(8.0),
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: original.unwrap_or(8192),
        },
        "longrope" | "su" => {
            let original = original.unwrap_or(max_pos);
            let factor = num("factor").unwrap_or(max_pos as f64 / original as f64);
            let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (original as f64).ln()).sqrt()
            });
            Rope::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(Error::unsupported(file, format!("rope type `{other}` (hone supports default, linear, llama3, longrope)")))
        }
    };
    Ok((theta, rope, partial))
}
