use crate::backend::{with_backend, BackendKind};
use crate::model;
use anyhow::Context;
use hone::data::Message;
use hone::generate::{generate, GenerateConfig};
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::{LoadOptions, Nf4Options};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory or a GGUF file (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the prompt as it is, not as a user turn of the chat template.
    #[arg(long)]
    raw: bool,
    /// Quantize the base to NF4 while loading (as when it was trained with QLoRA).
    #[arg(long)]
    nf4: bool,
    /// Print the new token ids instead of the text.
    #[arg(long)]
    ids: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = model::resolve(a.model.as_deref())?;
    let text = model::text(&path)?;
    let prompt_ids = if a.raw {
        text.tokenizer.encode(&a.prompt, true)?
    } else {
        let template = text.template.as_ref().context("this model has no chat template; use --raw")?;
        let rendered = template.render(&[Message { role: "user".into(), content: a.prompt.clone() }], true)?;
        text.tokenizer.encode(&rendered.text, false)?
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        stop_ids: text.stop_ids.clone(),
    };
    let new = with_backend!(a.backend, |B, device| {
        let mut m = model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
        if let Some(dir) = &a.adapter {
            Adapter::read(&Dir(dir.clone()))?.attach(m.linears_mut(), &device)?;
        }
        generate(&m, &prompt_ids, &cfg, &device)
    });
    if a.ids {
        println!("{}", new.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    } else {
        println!("{}", text.tokenizer.decode(&new, true)?.trim());
    }
    Ok(())
}
