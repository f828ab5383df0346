//! An adapter merged into a GGUF base, written as a GGUF llama.cpp loads: the base's metadata
//! (architecture, tokenizer, chat template) kept, `general.file_type` set to what is written,
//! every tensor dequantized to f32, an adapted weight given `s·B·A` (in the base's q/k row
//! order), and stored as F16, Q8_0 or Q4_0 (vectors, and rows not a whole number of 32-value
//! blocks, as llama.cpp's converter stores them: F32 and F16). Streamed tensor by tensor, so a
//! model is never whole in memory.

use crate::error::{Error, Result};
use crate::io::gguf::{GgmlType, Gguf, Value};
use crate::io::gguf_write::{alignment, encode, header, pad};
use crate::lora::merge::dora_rescale;
use crate::lora::peft::Adapter;
use crate::model::config::Arch;
use crate::model::gguf::{config_from_gguf, llama_cpp_name, permute};
use std::collections::BTreeMap;

/// What a merged GGUF's matrices are stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergedType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl MergedType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => MergedType::F32,
            "f16" => MergedType::F16,
            "q8_0" => MergedType::Q8_0,
            "q4_0" => MergedType::Q4_0,
            _ => return None,
        })
    }
    pub(crate) fn kind(self) -> GgmlType {
        match self {
            MergedType::F32 => GgmlType::F32,
            MergedType::F16 => GgmlType::F16,
            MergedType::Q8_0 => GgmlType::Q8_0,
            MergedType::Q4_0 => GgmlType::Q4_0,
        }
    }
    /// llama.cpp's `LlamaFileType` (`general.file_type`).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            MergedType::F32 => 0,
            MergedType::F16 => 1,
            MergedType::Q8_0 => 7,
            MergedType::Q4_0 => 2,
        }
    }
}

/// How a tensor of `shape` is stored in a file of type `ty`, as llama.cpp's converter stores it:
/// vectors (biases, norms, rope factors) F32, rows that are not whole 32-value blocks F16.
pub(crate) fn stored_kind(shape: &[usize], ty: MergedType) -> GgmlType {
    if shape.len() < 2 {
        GgmlType::F32
    } else if shape[shape.len() - 1] % ty.kind().block().0 != 0 {
        GgmlType::F16
    } else {
        ty.kind()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergedGguf {
    pub tensors: usize,
    pub merged_layers: usize,
    pub bytes: u64,
}

/// Streams the merged file's bytes to `sink`, in order.
pub fn merge_gguf(base: &Gguf, adapter: &Adapter, ty: MergedType, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<MergedGguf> {
    let config = config_from_gguf(base)?;
    let mut layers = BTreeMap::new();
    for l in &adapter.layers {
        let name = llama_cpp_name(Arch::Llama, &format!("{}.weight", l.module))
            .filter(|n| base.tensors.contains_key(n))
            .ok_or_else(|| Error::tensor(&adapter.source, &l.module, format!("{} has no weight for this module (is this the adapter of another model?)", base.name())))?;
        let want = base.tensors[&name].shape();
        if want != [l.b_shape[0], l.a_shape[1]] {
            return Err(Error::tensor(&adapter.source, &l.module, format!("A {:?} / B {:?} do not fit {name} {want:?} of {}", l.a_shape, l.b_shape, base.name())));
        }
        layers.insert(name, l);
    }
    let mut metadata: Vec<(String, Value)> = base.metadata.iter().filter(|(k, _)| k.as_str() != "general.file_type").map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.push(("general.file_type".into(), Value::U32(ty.file_type())));
    let infos: Vec<(String, Vec<usize>, GgmlType)> = base
        .tensors
        .values()
        .map(|t| {
            let shape = t.shape();
            let kind = stored_kind(&shape, ty);
            (t.name.clone(), shape, kind)
        })
        .collect();
    let align = alignment(&metadata);
    let head = header(&metadata, &infos);
    let mut written = head.len() as u64;
    sink(&head)?;
    for (name, shape, kind) in &infos {
        let (_, mut w) = base.read_f32(name)?;
        if let Some(l) = layers.get(name) {
            let mut d = l.delta(adapter.scaling());
            let mut magnitude = l.magnitude.clone();
            let cols = shape[1];
            // The base GGUF stores q/k rows interleaved; the adapter's rows are Hugging Face's.
            let heads = match name {
                n if n.ends_with("attn_q.weight") => Some(config.num_attention_heads),
                n if n.ends_with("attn_k.weight") => Some(config.num_key_value_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                d = permute(&d, heads, shape[0], cols);
                magnitude = magnitude.map(|m| permute(&m, heads, shape[0], 1));
            }
            for (x, y) in w.iter_mut().zip(&d) {
                *x += y;
            }
            if let Some(m) = &magnitude {
                dora_rescale(&mut w, m);
            }
        }
        let mut bytes = encode(*kind, &w).ok_or_else(|| Error::tensor(base.name(), name, format!("cannot be stored as {kind:?}")))?;
        pad(&mut bytes, align);
        written += bytes.len() as u64;
        sink(&bytes)?;
    }
    Ok(MergedGguf { tensors: infos.len(), merged_layers: layers.len(), bytes: written })
}
