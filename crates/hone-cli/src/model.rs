//! Opening a model the way every command does: a Hugging Face directory or a GGUF file, and
//! the default model (SmolLM2-135M-Instruct) when none is given.

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
pub type Text = hone::model::ModelText;

pub fn text(path: &Path) -> anyhow::Result<Text> {
    Ok(if is_gguf(path) { Text::from_gguf(&open_gguf(path)?)? } else { Text::from_files(&Dir(path.to_path_buf()))? })
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
