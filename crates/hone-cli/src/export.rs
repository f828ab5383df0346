//! `hone export`: an adapter in another runtime's format (llama.cpp's LoRA GGUF).

use anyhow::Context;
use hone::export::gguf_lora::lora_to_gguf;
use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::lora::peft::Adapter;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The PEFT LoRA adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// The base model the adapter was trained on (a Hugging Face directory, a GGUF file or a Hub id): its
    /// architecture decides llama.cpp's tensor names and layout. Only its config is read.
    #[arg(long)]
    model: PathBuf,
    /// Write a llama.cpp LoRA adapter GGUF here (for `llama-cli --lora`, ollama's ADAPTER, …).
    #[arg(long)]
    gguf: PathBuf,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    args.model = crate::hub::model_path(&args.model)?;
    let adapter = Adapter::read(&Dir(args.adapter.clone()))?;
    let config = if args.model.is_file() {
        hone::model::gguf::config_from_gguf(&Gguf::open(Box::new(FileSource::open(&args.model)?))?)?
    } else {
        hone::model::load::read_config(&Dir(args.model.clone()))?
    };
    let name = args.adapter.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let out = lora_to_gguf(&adapter, &config, &name)?;
    crate::logits::write_atomic(&args.gguf, &out.bytes).with_context(|| format!("writing {}", args.gguf.display()))?;
    let rslora = if adapter.use_rslora { format!(" (rsLoRA: alpha {} x sqrt(r {}), so llama.cpp's alpha / r is PEFT's alpha / sqrt(r))", adapter.alpha, adapter.r) } else { String::new() };
    eprintln!(
        "wrote {} ({} adapted layers, r {}, adapter.lora.alpha {}{rslora}): llama.cpp scales it by {}",
        args.gguf.display(),
        out.layers,
        adapter.r,
        out.alpha,
        adapter.scaling()
    );
    Ok(())
}
