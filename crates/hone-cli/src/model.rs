//! Opening a model the way every command does: a Hugging Face directory or a GGUF file, and
//! the default model (SmolLM2-135M-Instruct) when none is given.

use anyhow::Context;
use hone::data::{ChatTemplate, Tokenizer};
use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::model::{CausalLm, LoadOptions};
use hone::quant::HoneBackend;
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--model`, or the default model that `cargo xtask default-model` caches.
pub fn resolve(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let path = std::env::var_os("HONE_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("HONE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into()).join(".cache/hone")
        });
        cache.join("models").join(DEFAULT_MODEL_FILE)
    });
    anyhow::ensure!(path.exists(), "no --model given and the default model is not in {} yet: run `cargo xtask default-model`", path.display());
    Ok(path)
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn open_gguf(path: &Path) -> anyhow::Result<Gguf> {
    Ok(Gguf::open(Box::new(FileSource::open(path)?))?)
}

/// The tokenizer, the chat template, and the ids that end a reply.
pub struct Text {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

pub fn text(path: &Path) -> anyhow::Result<Text> {
    let (tokenizer, template, mut stop_ids) = if is_gguf(path) {
        let g = open_gguf(path)?;
        let config = hone::model::gguf::config_from_gguf(&g)?;
        (hone::data::gguf_tokenizer::tokenizer_from_gguf(&g)?, hone::data::gguf_tokenizer::chat_template_from_gguf(&g)?, config.eos_token_ids)
    } else {
        let dir = Dir(path.to_path_buf());
        let config = hone::model::load::read_config(&dir)?;
        let mut stops = config.eos_token_ids;
        if let Ok(g) = std::fs::read(path.join("generation_config.json")) {
            let v: serde_json::Value = serde_json::from_slice(&g).context("generation_config.json")?;
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => stops.extend(n.as_u64().map(|n| n as u32)),
                serde_json::Value::Array(a) => stops.extend(a.iter().filter_map(|n| n.as_u64().map(|n| n as u32))),
                _ => {}
            }
        }
        (Tokenizer::open(&dir)?, ChatTemplate::open(&dir)?, stops)
    };
    // The template's end-of-turn token ends a reply too.
    if let Some(id) = template.as_ref().and_then(|t| t.eos_token.as_deref()).and_then(|e| tokenizer.token_to_id(e)) {
        stop_ids.push(id);
    }
    for end in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(id) = tokenizer.token_to_id(end) {
            stop_ids.push(id);
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(Text { tokenizer, template, stop_ids })
}

pub fn weights<B: HoneBackend>(path: &Path, options: LoadOptions, device: &B::Device) -> anyhow::Result<CausalLm<B>> {
    if is_gguf(path) {
        let g = open_gguf(path)?;
        let (model, report) = hone::model::gguf::load_gguf_with_report::<B>(&g, options, device)?;
        if let Some(e) = report.nf4_rel_error {
            eprintln!("NF4 over the GGUF's weights adds {e:.2e} relative error (‖deq(NF4(W)) − W‖ / ‖W‖, decoder linears)");
        }
        Ok(model)
    } else {
        Ok(hone::model::load_model_with::<B>(&Dir(path.to_path_buf()), options, device)?)
    }
}
