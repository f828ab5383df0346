use crate::backend::{with_backend, BackendKind};
use anyhow::{bail, Context};
use hone::io::safetensors::write_f32;
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::{LoadOptions, Nf4Options};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a GGUF file or a Hub id (org/name[@revision][:FILE]).
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma-separated (or give --text).
    #[arg(long, value_delimiter = ',', conflicts_with = "text")]
    input_ids: Option<Vec<u32>>,
    /// Text, tokenized with the model's tokenizer, special tokens added (or give --input-ids).
    #[arg(long)]
    text: Option<String>,
    /// Output safetensors file with one f32 tensor `logits` of shape [sequence, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Where to compute: cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// A PEFT LoRA adapter directory to apply [default: none, the base alone].
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Quantize the base's decoder linears to NF4 while loading (QLoRA's frozen base).
    #[arg(long)]
    nf4: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    args.model = crate::hub::model_path(&args.model)?;
    let ids = match (&args.input_ids, &args.text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => crate::model::text(&args.model)?.tokenizer.encode(text, true)?,
        (None, None) => bail!("give --input-ids or --text"),
    };
    if ids.is_empty() {
        bail!("no input tokens");
    }
    let (vocab, logits) = with_backend!(args.backend, |B, device| {
        let options = LoadOptions { nf4: args.nf4.then(Nf4Options::default) };
        let mut model = crate::model::weights::<B>(&args.model, options, &device)?;
        if let Some(adapter) = &args.adapter {
            Adapter::read(&Dir(adapter.clone()))?.attach(model.linears_mut())?;
        }
        let vocab = model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        let logits = model.logits(&ids).into_data().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        (vocab, logits)
    });
    let bytes = write_f32(&[("logits", &[ids.len(), vocab], &logits)], &Default::default());
    write_atomic(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} ({} tokens x {} vocab)", args.out.display(), ids.len(), vocab);
    Ok(())
}

/// Temp file beside the target, then rename: a crash never leaves a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
