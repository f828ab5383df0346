//! `hone quantize`: a model directory saved pre-quantized in bitsandbytes' 4-bit layout, with
//! `quantization_config` in config.json, so that transformers + bitsandbytes load it as 4-bit
//! (and hone loads it without requantizing). Streamed: each tensor is read, quantized and
//! written on its own.

use super::load::{is_decoder_linear, Nf4Options, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::io::safetensors::StreamWriter;
use crate::io::weights::{Weights, WEIGHTS_FILE};
use crate::io::FileSet;
use crate::lora::merge::COPIED_FILES;
use crate::quant::bnb::{serialize, Serialized};
use crate::quant::Nf4Tensor;
use std::collections::BTreeMap;
use std::path::Path;

pub struct QuantizeReport {
    pub quantized: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

fn quantized(weights: &Weights, name: &str, o: Nf4Options) -> Result<Vec<Serialized>> {
    let (st, info) = weights.info(name).expect("indexed");
    let (_, values) = st.read_f32(name)?;
    let q = Nf4Tensor::quantize(&values, &info.shape, o.blocksize, o.double_quant).map_err(|m| Error::tensor(st.name(), name, m))?;
    Ok(serialize(name, &q))
}

pub fn quantize_to_dir(base: &dyn FileSet, out: &Path, o: Nf4Options) -> Result<QuantizeReport> {
    let out_name = out.display().to_string();
    if out.exists() {
        return Err(Error::io(&out_name, "already exists; choose a new output directory"));
    }
    let config_src = base.open_required(CONFIG_FILE)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&config_src.read_all()?).map_err(|e| Error::format(config_src.name(), e))?;
    if config.get("quantization_config").is_some_and(|q| !q.is_null()) {
        return Err(Error::unsupported(config_src.name(), "the model is already quantized"));
    }
    let weights = Weights::open(base)?;
    // Pass 1 lays out the file: a quantized weight's parts (and its JSON's length) are only
    // known once it is quantized. Pass 2 quantizes again and writes; memory stays one tensor.
    let mut declared = Vec::new();
    let mut bytes_before = 0u64;
    for name in weights.names() {
        let (_, info) = weights.info(name).expect("indexed");
        bytes_before += info.end - info.start;
        if is_decoder_linear(name) {
            declared.extend(quantized(&weights, name, o)?.into_iter().map(|(n, d, s, _)| (n, d, s)));
        } else {
            declared.push((name.clone(), info.dtype, info.shape.clone()));
        }
    }
    let tmp = out.with_file_name(format!(".{}.tmp-{}", out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
    let result = (|| -> Result<QuantizeReport> {
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut writer = StreamWriter::create(&tmp.join(WEIGHTS_FILE), &declared, &meta)?;
        let mut pending: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut quantized_count = 0;
        for name in writer.order() {
            let bytes = if let Some(b) = pending.remove(&name) {
                b
            } else if weights.contains(&name) && !is_decoder_linear(&name) {
                weights.info(&name).expect("indexed").0.read_raw(&name)?.1
            } else {
                // The packed codes come first in sorted order; keep the other parts until written.
                let base_name = name.clone();
                let parts = quantized(&weights, &base_name, o)?;
                quantized_count += 1;
                let mut first = None;
                for (n, _, _, b) in parts {
                    if n == name {
                        first = Some(b);
                    } else {
                        pending.insert(n, b);
                    }
                }
                first.ok_or_else(|| Error::tensor(WEIGHTS_FILE, &name, "not produced"))?
            };
            writer.write(&name, &bytes)?;
        }
        writer.finish()?;
        config["quantization_config"] = serde_json::json!({
            "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": o.double_quant, "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0,
            "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"
        });
        let mut cfg = serde_json::to_vec_pretty(&config).expect("json");
        cfg.push(b'\n');
        std::fs::write(tmp.join(CONFIG_FILE), cfg).map_err(|e| Error::io(CONFIG_FILE, e))?;
        for file in COPIED_FILES.iter().filter(|f| **f != CONFIG_FILE) {
            if let Some(src) = base.open(file)? {
                std::fs::write(tmp.join(file), src.read_all()?).map_err(|e| Error::io(*file, e))?;
            }
        }
        let bytes_after = std::fs::metadata(tmp.join(WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
        Ok(QuantizeReport { quantized: quantized_count, bytes_before, bytes_after })
    })();
    match result {
        Ok(r) => {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(&out_name, e))?;
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

