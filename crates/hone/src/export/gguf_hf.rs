//! A Hugging Face model, merged with an adapter (or not), as the GGUF llama.cpp's
//! `convert_hf_to_gguf.py` writes for it: the architecture's metadata from config.json, the
//! tokenizer's from the tokenizer files ([`super::gguf_vocab`]), the extra tensors the converter
//! derives (Llama 3.1's `rope_freqs`, Phi-3's long/short rope factors), and every weight under
//! llama.cpp's name with `s·B·A` added in f32 (q/k rows interleaved where the converter
//! interleaves them), stored as [`MergedType`] says. Streamed tensor by tensor.
//!
//! Not written: `general.size_label` and the converter's other descriptive `general.*` keys.

use super::gguf_merge::{stored_kind, MergedGguf, MergedType};
use super::gguf_vocab::vocab_metadata;
use crate::error::{Error, Result};
use crate::io::gguf::{GgmlType, Value};
use crate::io::gguf_write::{alignment, encode, header, pad};
use crate::io::weights::Weights;
use crate::io::FileSet;
use crate::lora::merge::merge_layer;
use crate::lora::peft::{Adapter, HostLora};
use crate::model::config::{Arch, Config, Rope};
use crate::model::gguf::{llama_cpp_arch, llama_cpp_name, llama_cpp_qk_heads, permute};
use std::collections::BTreeMap;

/// A tensor to write and where its values come from.
enum Source {
    /// Values the converter computes (rope factors).
    Made(Vec<f32>),
    /// A checkpoint tensor by its Hugging Face name.
    Weight(String),
}

/// Streams the GGUF of the model in `files` (with `adapter` merged) to `sink`; `name` goes into
/// `general.name`.
pub fn hf_to_gguf(files: &dyn FileSet, adapter: Option<&Adapter>, ty: MergedType, name: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<MergedGguf> {
    let config = crate::model::load::read_config(files)?;
    if config.bnb_nf4 {
        return Err(Error::unsupported(files.location(), "a bitsandbytes (NF4) checkpoint: merge with --out first (it dequantizes), then write the GGUF from that directory"));
    }
    let raw: serde_json::Value = {
        let src = files.open_required("config.json")?;
        serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(src.name(), e))?
    };
    let weights = Weights::open(files)?;
    let mut metadata = model_metadata(&config, &raw, ty, name);
    metadata.extend(vocab_metadata(files, config.arch, config.vocab_size)?);

    let layers: BTreeMap<String, &HostLora> = adapter.map(|a| a.layers.iter().map(|l| (format!("{}.weight", l.module), l)).collect()).unwrap_or_default();
    for key in layers.keys() {
        if !weights.contains(key) {
            return Err(Error::tensor(&adapter.expect("layers come from it").source, key, "the base model has no such weight (is this the adapter of another model?)"));
        }
    }
    let mut tensors: Vec<(String, Vec<usize>, GgmlType, Source)> = extra_tensors(&config).into_iter().map(|(n, v)| (n, vec![v.len()], GgmlType::F32, Source::Made(v))).collect();
    for hf in weights.names() {
        if hf == "lm_head.weight" && config.tie_word_embeddings {
            continue;
        }
        let gguf = llama_cpp_name(config.arch, hf).ok_or_else(|| Error::tensor(weights.location(), hf, "llama.cpp has no tensor of this name for this architecture"))?;
        let (_, info) = weights.info(hf).expect("listed");
        let shape = info.shape.clone();
        let kind = stored_kind(&shape, ty);
        tensors.push((gguf, shape, kind, Source::Weight(hf.clone())));
    }

    let infos: Vec<(String, Vec<usize>, GgmlType)> = tensors.iter().map(|(n, s, k, _)| (n.clone(), s.clone(), *k)).collect();
    let align = alignment(&metadata);
    let head = header(&metadata, &infos);
    let mut written = head.len() as u64;
    sink(&head)?;
    let mut merged_layers = 0;
    for (gguf, shape, kind, source) in tensors {
        let values = match source {
            Source::Made(v) => v,
            Source::Weight(hf) => {
                let mut w = weights.read(&hf, &shape)?;
                if let Some(l) = layers.get(&hf) {
                    let a = adapter.expect("layers come from it");
                    if shape != [l.b_shape[0], l.a_shape[1]] {
                        return Err(Error::tensor(&a.source, &hf, format!("A {:?} / B {:?} do not fit the base's {shape:?}", l.a_shape, l.b_shape)));
                    }
                    merge_layer(&mut w, l, a.scaling());
                    merged_layers += 1;
                }
                // q/k rows in the order the converter stores them.
                match llama_cpp_qk_heads(&config, &hf) {
                    Some(heads) => permute(&w, heads, shape[0], shape.get(1).copied().unwrap_or(1)),
                    None => w,
                }
            }
        };
        let mut bytes = encode(kind, &values).ok_or_else(|| Error::tensor(files.location(), &gguf, format!("cannot be stored as {kind:?}")))?;
        pad(&mut bytes, align);
        written += bytes.len() as u64;
        sink(&bytes)?;
    }
    Ok(MergedGguf { tensors: infos.len(), merged_layers, bytes: written })
}

/// The architecture's keys, as the converter writes them for each model class.
fn model_metadata(config: &Config, raw: &serde_json::Value, ty: MergedType, name: &str) -> Vec<(String, Value)> {
    let arch = llama_cpp_arch(config.arch);
    let k = |key: &str| format!("{arch}.{key}");
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
    ];
    let explicit_head_dim = raw.get("head_dim").and_then(serde_json::Value::as_u64).is_some();
    match config.arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => {
            m.push((k("block_count"), u(config.num_hidden_layers)));
            m.push((k("context_length"), u(config.max_position_embeddings)));
            m.push((k("embedding_length"), u(config.hidden_size)));
            m.push((k("feed_forward_length"), u(config.intermediate_size)));
            m.push((k("attention.head_count"), u(config.num_attention_heads)));
            m.push((k("attention.head_count_kv"), u(config.num_key_value_heads)));
            if let Rope::Linear { factor } = config.rope {
                m.push((k("rope.scaling.type"), Value::String("linear".into())));
                m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
            }
            m.push((k("rope.freq_base"), Value::F32(config.rope_theta as f32)));
            m.push((k("attention.layer_norm_rms_epsilon"), Value::F32(config.rms_norm_eps as f32)));
            if explicit_head_dim {
                m.push((k("attention.key_length"), u(config.head_dim)));
                m.push((k("attention.value_length"), u(config.head_dim)));
            }
            m.push(("general.file_type".into(), Value::U32(ty.file_type())));
            if config.arch != Arch::Qwen2 {
                m.push((k("vocab_size"), u(config.vocab_size)));
                m.push((k("rope.dimension_count"), u(config.head_dim)));
            }
        }
        Arch::Phi3 => {
            let rope_dims = (config.partial_rotary_factor * config.hidden_size as f64) as usize / config.num_attention_heads;
            let original = match &config.rope {
                Rope::LongRope { original_max_position_embeddings, .. } => *original_max_position_embeddings,
                _ => raw.get("original_max_position_embeddings").and_then(serde_json::Value::as_u64).map_or(config.max_position_embeddings, |v| v as usize),
            };
            if let Rope::LongRope { .. } = config.rope {
                let scale = config.max_position_embeddings as f64 / original as f64;
                let attn = if scale > 1.0 { (1.0 + scale.ln() / (original as f64).ln()).sqrt() } else { 1.0 };
                m.insert(1, (k("rope.scaling.attn_factor"), Value::F32(attn as f32)));
            }
            m.push((k("context_length"), u(config.max_position_embeddings)));
            m.push((k("rope.scaling.original_context_length"), u(original)));
            m.push((k("embedding_length"), u(config.hidden_size)));
            m.push((k("feed_forward_length"), u(config.intermediate_size)));
            m.push((k("block_count"), u(config.num_hidden_layers)));
            m.push((k("attention.head_count"), u(config.num_attention_heads)));
            m.push((k("attention.head_count_kv"), u(config.num_key_value_heads)));
            m.push((k("attention.layer_norm_rms_epsilon"), Value::F32(config.rms_norm_eps as f32)));
            m.push((k("rope.dimension_count"), u(rope_dims)));
            m.push((k("rope.freq_base"), Value::F32(config.rope_theta as f32)));
            m.push(("general.file_type".into(), Value::U32(ty.file_type())));
            m.push((k("attention.sliding_window"), u(config.sliding_window.unwrap_or(0))));
        }
    }
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m
}

/// The tensors the converter computes from config.json: Llama 3.1's per-frequency rope factors
/// (`rope_freqs.weight`), Phi-3's LongRoPE factors.
fn extra_tensors(config: &Config) -> Vec<(String, Vec<f32>)> {
    match &config.rope {
        Rope::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } if matches!(config.arch, Arch::Llama | Arch::Mistral) => {
            // In f32, as the converter computes them (torch tensors, Python scalars cast).
            let dim = config.head_dim;
            let old = *original_max_position_embeddings as f32;
            let (low, factor) = (*low_freq_factor as f32, *factor as f32);
            let (low_wavelen, high_wavelen) = ((*original_max_position_embeddings as f64 / low_freq_factor) as f32, (*original_max_position_embeddings as f64 / high_freq_factor) as f32);
            let span = (high_freq_factor - low_freq_factor) as f32;
            let factors = (0..dim)
                .step_by(2)
                .map(|i| {
                    let freq = 1.0 / (config.rope_theta as f32).powf(i as f32 / dim as f32);
                    let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (old / wavelen - low) / span;
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            vec![("rope_freqs.weight".into(), factors)]
        }
        // Read from a GGUF file: written back as they came.
        Rope::Divisors(d) if matches!(config.arch, Arch::Llama | Arch::Mistral) => vec![("rope_freqs.weight".into(), d.iter().map(|&v| v as f32).collect())],
        Rope::LongRope { short_factor, long_factor, .. } if config.arch == Arch::Phi3 => vec![
            ("rope_factors_long.weight".into(), long_factor.iter().map(|&v| v as f32).collect()),
            ("rope_factors_short.weight".into(), short_factor.iter().map(|&v| v as f32).collect()),
        ],
        _ => Vec::new(),
    }
}
