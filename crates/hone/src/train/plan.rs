//! How much memory a run needs, from config.json alone (before any weight is read), so that the
//! page can say "this model does not fit" up front and the CLI can plan a big job.
//!
//! The base: NF4 decoder linears as hone keeps them on the device (4-bit codes packed in i32
//! words, and an f32 absmax per 64 weights: the double-quantized absmax is expanded at load so
//! dequantizing is exact), f32 embeddings, norms and an untied lm_head. LoRA: A
//! and B, their gradients and AdamW's two moments, all f32. Activations: what the backward pass
//! keeps per token and layer, plus the logits and their gradient.

use crate::lora::LoraConfig;
use crate::model::{Arch, Config};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    pub base_bytes: u64,
    pub lora_params: u64,
    /// LoRA weights, gradients and optimizer moments.
    pub lora_bytes: u64,
    pub activation_bytes: u64,
    pub total_bytes: u64,
    /// The biggest single buffer (a GPU's maxBufferSize must hold it).
    pub largest_buffer_bytes: u64,
    pub largest_buffer: &'static str,
}

/// Every decoder linear as (HF module name, in, out).
pub fn linear_shapes(c: &Config) -> Vec<(String, u64, u64)> {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, i_: u64, o: u64| out.push((format!("{p}.{name}"), i_, o));
        if c.arch == Arch::Phi3 {
            add("self_attn.qkv_proj", h, q + 2 * kv);
            add("mlp.gate_up_proj", h, 2 * i);
        } else {
            add("self_attn.q_proj", h, q);
            add("self_attn.k_proj", h, kv);
            add("self_attn.v_proj", h, kv);
            add("mlp.gate_proj", h, i);
            add("mlp.up_proj", h, i);
        }
        add("self_attn.o_proj", q, h);
        add("mlp.down_proj", i, h);
    }
    out
}

/// Device bytes of NF4 storage for `n` weights: codes in i32 words, an f32 absmax per 64.
pub fn nf4_bytes(n: u64) -> u64 {
    4 * n.div_ceil(8) + 4 * n.div_ceil(64)
}

pub fn estimate(c: &Config, lora: &LoraConfig, batch: usize, seq: usize, nf4: bool) -> MemoryPlan {
    let linears = linear_shapes(c);
    let linear_weights: u64 = linears.iter().map(|(_, i, o)| i * o).sum();
    let (v, h) = (c.vocab_size as u64, c.hidden_size as u64);
    let embed = v * h * 4;
    let head = if c.tie_word_embeddings { 0 } else { v * h * 4 };
    let norms = (2 * c.num_hidden_layers as u64 + 1) * h * 4;
    let base_linears = if nf4 { linears.iter().map(|(_, i, o)| nf4_bytes(i * o)).sum() } else { linear_weights * 4 };
    let base_bytes = embed + head + norms + base_linears;

    let lora_params: u64 = linears.iter().filter(|(n, _, _)| lora.targets.matches(n)).map(|(_, i, o)| lora.r as u64 * (i + o)).sum();
    let lora_bytes = lora_params * 4 * 4;

    let tokens = (batch * seq) as u64;
    let (i, q) = (c.intermediate_size as u64, (c.num_attention_heads * c.head_dim) as u64);
    // Per token and layer, kept for backward: norms' inputs and outputs, q/k/v, attention out,
    // MLP gate/up/act; attention probabilities per head and key position.
    let per_token_layer = 4 * (4 * h + 3 * q + 3 * i) + 4 * (c.num_attention_heads * seq) as u64;
    let logits = tokens * v * 4;
    let activation_bytes = tokens * c.num_hidden_layers as u64 * per_token_layer + 3 * logits;
    // The largest linear, dequantized on the fly for a matmul.
    let largest_linear = linears.iter().map(|(_, i, o)| i * o * 4).max().unwrap_or(0);
    let (largest_buffer_bytes, largest_buffer) = [(embed, "embed_tokens"), (logits, "logits"), (largest_linear, "a dequantized linear")]
        .into_iter()
        .max_by_key(|x| x.0)
        .expect("three candidates");
    MemoryPlan {
        base_bytes,
        lora_params,
        lora_bytes,
        activation_bytes,
        total_bytes: base_bytes + lora_bytes + activation_bytes + largest_linear,
        largest_buffer_bytes,
        largest_buffer,
    }
}

/// Bytes as the page and CLI print them.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}
