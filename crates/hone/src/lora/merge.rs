//! Merging an adapter into its base: `W + s·B·A`, as PEFT's `merge_and_unload` computes it in
//! f32 (DoRA: each row then scaled by `m_i / ‖(W + s·B·A)_i‖`), written out as a standard model directory (same keys, config and tokenizer as the
//! base, no LoRA keys), streamed tensor by tensor.

use super::peft::{Adapter, HostLora};
use crate::error::{Error, Result};
use crate::io::safetensors::{from_f32, to_f32, Dtype, StreamWriter};
use crate::quant::bnb::{deserialize, QUANT_STATE_SUFFIX};
use crate::io::weights::{Weights, WEIGHTS_FILE};
use crate::io::FileSet;
use std::collections::BTreeMap;
use std::path::Path;

/// DoRA's merge, after `s·B·A` was added to `w` (`[out, in]`): each row scaled to the length
/// the magnitude gives it, as PEFT's `merge_and_unload` does.
pub fn dora_rescale(w: &mut [f32], magnitude: &[f32]) {
    let cols = w.len() / magnitude.len().max(1);
    for (row, m) in w.chunks_exact_mut(cols).zip(magnitude) {
        let norm = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32;
        let factor = m / norm;
        row.iter_mut().for_each(|v| *v *= factor);
    }
}

/// One adapted weight merged in place: `w += s·B·A` in f32, then DoRA's row rescale.
pub fn merge_layer(w: &mut [f32], layer: &HostLora, scaling: f64) {
    for (w, d) in w.iter_mut().zip(layer.delta(scaling)) {
        *w += d;
    }
    if let Some(m) = &layer.magnitude {
        dora_rescale(w, m);
    }
}

/// Files copied unchanged from the base directory when present.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
];

pub struct MergeReport {
    pub merged_layers: usize,
    pub tensors: usize,
    /// The base was a bitsandbytes NF4 checkpoint: the adapter was merged into its dequantized
    /// weights and the output is a dense (f32) model.
    pub dequantized_nf4_base: bool,
}

/// Whether a base directory holds a bitsandbytes 4-bit checkpoint (its config.json says so).
fn is_bnb_checkpoint(base: &dyn FileSet) -> Result<bool> {
    let Some(src) = base.open("config.json")? else { return Ok(false) };
    let cfg: serde_json::Value = serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(src.name(), e))?;
    Ok(cfg.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(|m| m.as_str()) == Some("bitsandbytes"))
}

/// Writes the merged model into `out` (created atomically: a temp dir, then renamed).
pub fn merge_to_dir(base: &dyn FileSet, adapter: &Adapter, out: &Path) -> Result<MergeReport> {
    let out_name = out.display().to_string();
    if out.exists() {
        return Err(Error::io(&out_name, "already exists; choose a new output directory"));
    }
    let weights = Weights::open(base)?;
    let by_key: BTreeMap<String, &HostLora> = adapter.layers.iter().map(|l| (format!("{}.weight", l.module), l)).collect();
    for key in by_key.keys() {
        if !weights.contains(key) {
            return Err(Error::tensor(&adapter.source, key, "the base model has no such weight"));
        }
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
    let result = write_merged(base, &weights, &by_key, adapter, &tmp);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return result;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(&out_name, e))?;
    result
}

/// The NF4 weights of a bitsandbytes checkpoint: base name → dense shape.
fn nf4_weights(weights: &Weights) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for name in weights.names() {
        if let Some(base) = name.strip_suffix(&format!(".{QUANT_STATE_SUFFIX}")) {
            let q = read_nf4(weights, base)?;
            out.insert(base.to_string(), q.shape);
        }
    }
    Ok(out)
}

fn read_nf4(weights: &Weights, name: &str) -> Result<crate::quant::Nf4Tensor> {
    deserialize(name, |k| match weights.info(k) {
        Some((st, _)) => st.read_raw(k).map(|(_, b)| Some(b)).map_err(|e| e.to_string()),
        None => Ok(None),
    })
    .map_err(|m| Error::tensor(weights.location(), name, m))
}

fn write_merged(
    base: &dyn FileSet,
    weights: &Weights,
    by_key: &BTreeMap<String, &HostLora>,
    adapter: &Adapter,
    dir: &Path,
) -> Result<MergeReport> {
    // An NF4 checkpoint's quantized weights come out dense (f32) and their parts are dropped.
    let nf4 = if is_bnb_checkpoint(base)? { nf4_weights(weights)? } else { BTreeMap::new() };
    let is_part = |name: &str| nf4.keys().any(|b| name.len() > b.len() && name.starts_with(b.as_str()) && name[b.len()..].starts_with('.'));
    let mut declared = Vec::new();
    for name in weights.names() {
        if is_part(name) {
            continue;
        }
        match nf4.get(name) {
            Some(shape) => declared.push((name.clone(), Dtype::F32, shape.clone())),
            None => {
                let (_, info) = weights.info(name).expect("indexed");
                declared.push((name.clone(), info.dtype, info.shape.clone()));
            }
        }
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = StreamWriter::create(&dir.join(WEIGHTS_FILE), &declared, &meta)?;
    let mut merged_layers = 0;
    for name in writer.order() {
        let (st, _) = weights.info(&name).expect("indexed");
        let (mut info, mut bytes) = st.read_raw(&name)?;
        if nf4.contains_key(&name) {
            let q = read_nf4(weights, &name)?;
            bytes = from_f32(Dtype::F32, &q.dequantize()).expect("f32");
            info.dtype = Dtype::F32;
            info.shape = q.shape;
        }
        let bytes = match by_key.get(&name) {
            Some(layer) => {
                let mut w = to_f32(info.dtype, &bytes).ok_or_else(|| Error::tensor(st.name(), &name, "not a float weight"))?;
                if info.shape != [layer.b_shape[0], layer.a_shape[1]] {
                    return Err(Error::tensor(&adapter.source, &name, format!("adapter does not fit the base's shape {:?}", info.shape)));
                }
                merge_layer(&mut w, layer, adapter.scaling());
                merged_layers += 1;
                from_f32(info.dtype, &w).expect("float dtype")
            }
            None => bytes,
        };
        writer.write(&name, &bytes)?;
    }
    writer.finish()?;
    for file in COPIED_FILES {
        if let Some(src) = base.open(file)? {
            let mut bytes = src.read_all()?;
            if *file == "config.json" && !nf4.is_empty() {
                // A dense model now: without its quantization_config.
                let mut cfg: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::format(src.name(), e))?;
                if let Some(obj) = cfg.as_object_mut() {
                    obj.remove("quantization_config");
                }
                bytes = serde_json::to_vec_pretty(&cfg).expect("json");
                bytes.push(b'\n');
            }
            std::fs::write(dir.join(file), bytes).map_err(|e| Error::io(dir.join(file).display(), e))?;
        }
    }
    Ok(MergeReport { merged_layers, tensors: declared.len(), dequantized_nf4_base: !nf4.is_empty() })
}
