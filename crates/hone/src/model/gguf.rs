//! Llama-architecture GGUF files as hone models: the config from `llama.*` metadata (rope
//! scaling too: linear from `llama.rope.scaling.*`, Llama 3.1's as the per-frequency divisors
//! llama.cpp's converter stores in `rope_freqs.weight`), tensors
//! renamed to Hugging Face's names and dequantized to f32 as they are read, and q/k projections
//! un-permuted (llama.cpp's converter interleaves their rotary halves). With NF4 on, each
//! decoder linear is then quantized to NF4 as it loads. The same naming and interleaving, per
//! architecture, serve `export` when it writes GGUF files for llama.cpp.

use super::config::{Arch, Config, Rope};
use super::decoder::CausalLm;
use super::load::{build_with_report, LoadOptions, LoadReport, TensorSource};
use crate::data::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
use crate::data::{ChatTemplate, Tokenizer};
use crate::error::{Error, Result};
use crate::io::gguf::{Gguf, Value};
use crate::ops::HoneBackend;

pub fn config_from_gguf(g: &Gguf) -> Result<Config> {
    let file = g.name().to_string();
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("?");
    if arch != "llama" {
        return Err(Error::unsupported(&file, format!("GGUF architecture `{arch}` (hone reads llama-architecture GGUF files)")));
    }
    let num = |key: &str| -> Result<usize> {
        g.get(&format!("llama.{key}")).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| Error::format(&file, format!("missing `llama.{key}`")))
    };
    let hidden_size = num("embedding_length")?;
    let heads = num("attention.head_count")?;
    let vocab = match num("vocab_size") {
        Ok(v) => v,
        Err(_) => g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len()).ok_or_else(|| Error::format(&file, "no vocabulary size"))?,
    };
    // The checks config.json gets (Config::from_json): a zero count would divide by zero.
    if heads == 0 || hidden_size % heads != 0 && num("rope.dimension_count").is_err() {
        return Err(Error::format(&file, "llama.embedding_length is not a multiple of llama.attention.head_count"));
    }
    let kv_heads = num("attention.head_count_kv").unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::format(&file, "llama.attention.head_count is not a multiple of llama.attention.head_count_kv"));
    }
    let head_dim = num("rope.dimension_count").unwrap_or(hidden_size / heads);
    let rope = rope_from_gguf(g, head_dim)?;
    let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
    Ok(Config {
        arch: Arch::Llama,
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers: num("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.get("llama.attention.layer_norm_rms_epsilon").and_then(Value::as_f64).unwrap_or(1e-5),
        max_position_embeddings: num("context_length").unwrap_or(2048),
        rope_theta: g.get("llama.rope.freq_base").and_then(Value::as_f64).unwrap_or(10000.0),
        rope,
        partial_rotary_factor: 1.0,
        tie_word_embeddings: !g.tensors.contains_key("output.weight"),
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        dtype: Some("float32".into()),
        bnb_nf4: false,
    })
}

/// The rope scaling a llama GGUF carries: linear from `llama.rope.scaling.*`, or one divisor per
/// frequency in `rope_freqs.weight` (what llama.cpp's converter writes for Llama 3.1's scaling).
/// Ignoring either would give other positions than the model was trained with, so a scaling hone
/// does not implement is refused.
fn rope_from_gguf(g: &Gguf, head_dim: usize) -> Result<Rope> {
    let file = g.name();
    let kind = g.get("llama.rope.scaling.type").map(|v| v.as_str().ok_or_else(|| Error::format(file, "`llama.rope.scaling.type` is not a string"))).transpose()?;
    let scaling = match kind.unwrap_or("none") {
        "none" => None,
        "linear" => {
            let factor = g.get("llama.rope.scaling.factor").and_then(Value::as_f64).ok_or_else(|| Error::format(file, "linear rope scaling without `llama.rope.scaling.factor`"))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(Error::format(file, format!("`llama.rope.scaling.factor` is {factor}; it must be positive")));
            }
            Some(Rope::Linear { factor })
        }
        other => return Err(Error::unsupported(file, format!("rope scaling `{other}` (`llama.rope.scaling.type`; hone reads none, linear and per-frequency factors)"))),
    };
    const FACTORS: &str = "rope_freqs.weight";
    if !g.tensors.contains_key(FACTORS) {
        return Ok(scaling.unwrap_or(Rope::Default));
    }
    if scaling.is_some() {
        return Err(Error::tensor(file, FACTORS, "per-frequency factors and `llama.rope.scaling.type` both set: hone does not combine them"));
    }
    let (shape, factors) = g.read_f32(FACTORS)?;
    if shape != [head_dim / 2] {
        return Err(Error::tensor(file, FACTORS, format!("shape {shape:?}; the head size {head_dim} has {} frequencies", head_dim / 2)));
    }
    if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(Error::tensor(file, FACTORS, format!("holds {bad}; a frequency's divisor must be positive")));
    }
    Ok(Rope::Divisors(factors.iter().map(|&f| f as f64).collect()))
}

/// Tensors of a llama GGUF under Hugging Face names.
pub struct GgufWeights<'a> {
    pub gguf: &'a Gguf,
    pub config: &'a Config,
}

impl GgufWeights<'_> {
    fn gguf_name(name: &str) -> Option<String> {
        llama_cpp_name(Arch::Llama, name)
    }
}

/// llama.cpp's name for an architecture (`general.architecture`): Mistral is converted as llama.
pub fn llama_cpp_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Phi3 => "phi3",
    }
}

/// llama.cpp's converter stores q/k rows interleaved for the architectures it converts as llama.
pub fn llama_cpp_permutes_qk(arch: Arch) -> bool {
    matches!(arch, Arch::Llama | Arch::Mistral)
}

/// The llama.cpp tensor name of a Hugging Face weight (or bias) name; `None` for names llama.cpp
/// has no tensor for.
pub fn llama_cpp_name(arch: Arch, name: &str) -> Option<String> {
    Some(match name {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = name.strip_prefix("model.layers.")?;
            let (i, rest) = rest.split_once('.')?;
            i.parse::<usize>().ok()?;
            let (module, kind) = rest.rsplit_once('.')?;
            if !matches!(kind, "weight" | "bias") {
                return None;
            }
            let part = match (module, arch) {
                ("input_layernorm", _) => "attn_norm",
                ("post_attention_layernorm", _) => "ffn_norm",
                ("self_attn.q_proj", _) => "attn_q",
                ("self_attn.k_proj", _) => "attn_k",
                ("self_attn.v_proj", _) => "attn_v",
                ("self_attn.qkv_proj", Arch::Phi3) => "attn_qkv",
                ("self_attn.o_proj", _) => "attn_output",
                ("mlp.gate_proj", _) => "ffn_gate",
                ("mlp.up_proj", _) => "ffn_up",
                // Phi-3 keeps gate and up fused; llama.cpp splits them in its graph.
                ("mlp.gate_up_proj", Arch::Phi3) => "ffn_up",
                ("mlp.down_proj", _) => "ffn_down",
                _ => return None,
            };
            format!("blk.{i}.{part}.{kind}")
        }
    })
}

/// The head count whose rotary halves llama.cpp's converter interleaves in this Hugging Face
/// weight, bias or module (q_proj: attention heads, k_proj: key/value heads); `None` for any
/// other, and for architectures it does not interleave.
pub fn llama_cpp_qk_heads(config: &Config, hf: &str) -> Option<usize> {
    if !llama_cpp_permutes_qk(config.arch) {
        return None;
    }
    let module = hf.strip_suffix(".weight").or_else(|| hf.strip_suffix(".bias")).unwrap_or(hf);
    match module.rsplit('.').next()? {
        "q_proj" => Some(config.num_attention_heads),
        "k_proj" => Some(config.num_key_value_heads),
        _ => None,
    }
}

/// llama.cpp's converter's `permute` of q/k rows `[heads * head_dim, cols]`: within each head,
/// the two rotary halves become interleaved pairs. The inverse of [`unpermute`].
pub fn permute(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    regroup_rotary_rows(w, heads, rows, cols, true)
}

/// Undoes llama.cpp's `permute` of a q/k weight `[heads * head_dim, cols]`: within each head,
/// rows stored as interleaved pairs go back to the two rotary halves.
fn unpermute(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    regroup_rotary_rows(w, heads, rows, cols, false)
}

/// Within each head, Hugging Face's row `j*half + i` is llama.cpp's row `2*i + j`.
fn regroup_rotary_rows(w: &[f32], heads: usize, rows: usize, cols: usize, to_llama_cpp: bool) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (hf, stored) = ((h * hd + j * half + i) * cols, (h * hd + 2 * i + j) * cols);
                let (src, dst) = if to_llama_cpp { (hf, stored) } else { (stored, hf) };
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

impl TensorSource for GgufWeights<'_> {
    fn location(&self) -> String {
        self.gguf.name().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|n| self.gguf.tensors.contains_key(&n))
    }
    fn names(&self) -> Vec<String> {
        self.gguf.tensors.keys().cloned().collect()
    }
    fn stored_name(&self, name: &str) -> String {
        Self::gguf_name(name).unwrap_or_else(|| name.to_string())
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let g = Self::gguf_name(name).ok_or_else(|| Error::tensor(self.gguf.name(), name, "no GGUF counterpart"))?;
        let (got, values) = self.gguf.read_f32(&g)?;
        if got != shape {
            return Err(Error::tensor(self.gguf.name(), &g, format!("shape {got:?} does not match the metadata, which implies {shape:?}")));
        }
        Ok(if name.ends_with("q_proj.weight") {
            unpermute(&values, self.config.num_attention_heads, shape[0], shape[1])
        } else if name.ends_with("k_proj.weight") {
            unpermute(&values, self.config.num_key_value_heads, shape[0], shape[1])
        } else {
            values
        })
    }
    fn raw(&self, _name: &str) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
}

/// A llama GGUF as a hone model, with its tokenizer and chat template.
pub fn load_gguf<B: HoneBackend>(gguf: &Gguf, options: LoadOptions, device: &B::Device) -> Result<(CausalLm<B>, Tokenizer, Option<ChatTemplate>)> {
    let (model, _) = load_gguf_with_report(gguf, options, device)?;
    Ok((model, tokenizer_from_gguf(gguf)?, chat_template_from_gguf(gguf)?))
}

/// As [`load_gguf`], with the error NF4 adds over the GGUF's own (dequantized) values.
pub fn load_gguf_with_report<B: HoneBackend>(gguf: &Gguf, options: LoadOptions, device: &B::Device) -> Result<(CausalLm<B>, LoadReport)> {
    let config = config_from_gguf(gguf)?;
    build_with_report(config.clone(), &GgufWeights { gguf, config: &config }, options, device)
}
