//! A PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF, the file llama.cpp's
//! `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, and per adapted linear `<llama.cpp weight name>.lora_a` (`[r, in]`) and
//! `.lora_b` (`[out, r]`), f32. Where the converter stores a base's q/k rows interleaved (the
//! architectures it converts as llama), lora_b's rows are interleaved the same way, so
//! `B·A` lines up with the base GGUF's weight.
//!
//! llama.cpp scales an adapter by alpha / rank and has no rsLoRA; for an rsLoRA adapter
//! (scale alpha / √r) the alpha written is alpha·√r, which gives PEFT's scale. (The converter
//! writes the config's alpha as it is, changing such an adapter's behaviour.)

use crate::error::{Error, Result};
use crate::io::gguf::Value;
use crate::io::gguf_write::{write, TensorOut};
use crate::lora::peft::Adapter;
use crate::model::config::Config;
use crate::model::gguf::{llama_cpp_arch, llama_cpp_name, llama_cpp_qk_heads, permute};
use crate::train::plan::linear_shapes;
use std::collections::BTreeMap;

/// What an export wrote, for the command's summary.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLora {
    pub bytes: Vec<u8>,
    pub layers: usize,
    /// `adapter.lora.alpha` as written (alpha·√r for an rsLoRA adapter).
    pub alpha: f32,
}

/// The adapter's GGUF for a base of `config`'s architecture; `name` goes into `general.name`.
pub fn lora_to_gguf(adapter: &Adapter, config: &Config, name: &str) -> Result<GgufLora> {
    if adapter.use_dora {
        return Err(Error::unsupported(&adapter.source, "DoRA adapters: llama.cpp's LoRA adapters have no magnitude vector; merge the adapter instead (`hone merge --gguf`)"));
    }
    let mut layers: Vec<_> = adapter.layers.iter().collect();
    layers.sort_by(|a, b| a.module.cmp(&b.module));
    let mut shapes: BTreeMap<String, [usize; 2]> = linear_shapes(config).into_iter().map(|(m, i, o)| (m, [o as usize, i as usize])).collect();
    shapes.insert("lm_head".into(), [config.vocab_size, config.hidden_size]);
    let mut tensors = Vec::with_capacity(2 * layers.len());
    for l in layers {
        // llama.cpp refuses a mismatch only when it loads the file: say so now, by module.
        let [out, inp] = *shapes.get(&l.module).ok_or_else(|| Error::tensor(&adapter.source, &l.module, "the base has no such linear layer (is this the adapter of another model?)"))?;
        if l.a_shape[1] != inp || l.b_shape[0] != out {
            return Err(Error::tensor(&adapter.source, &l.module, format!("A {:?} / B {:?} do not fit the base's [{out}, {inp}] weight (is this the adapter of another model?)", l.a_shape, l.b_shape)));
        }
        let hf = format!("{}.weight", l.module);
        if hf == "lm_head.weight" && config.tie_word_embeddings {
            // The converter refuses this too: llama.cpp's output weight is the embedding table.
            return Err(Error::unsupported(&adapter.source, "an adapter on lm_head of a base with tied embeddings (llama.cpp has no separate output weight to adapt): merge the adapter instead (`hone merge`)"));
        }
        let gguf = llama_cpp_name(config.arch, &hf).filter(|n| !n.starts_with("token_embd") && !n.ends_with("_norm.weight")).ok_or_else(|| {
            Error::tensor(&adapter.source, &l.module, "llama.cpp has no linear weight of this name to adapt: merge the adapter instead (`hone merge`)")
        })?;
        let r = l.b_shape[1];
        let b = match llama_cpp_qk_heads(config, &l.module) {
            Some(heads) => permute(&l.b, heads, out, r),
            None => l.b.clone(),
        };
        tensors.push(TensorOut::f32(format!("{gguf}.lora_a"), l.a_shape.to_vec(), &l.a));
        tensors.push(TensorOut::f32(format!("{gguf}.lora_b"), l.b_shape.to_vec(), &b));
    }
    let alpha = if adapter.use_rslora { adapter.alpha * (adapter.r as f64).sqrt() } else { adapter.alpha } as f32;
    let metadata = vec![
        ("general.architecture".to_string(), Value::String(llama_cpp_arch(config.arch).into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("general.name".into(), Value::String(name.into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    Ok(GgufLora { bytes: write(&metadata, &tensors), layers: tensors.len() / 2, alpha })
}

