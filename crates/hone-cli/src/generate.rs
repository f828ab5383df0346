use crate::backend::{with_backend, BackendKind};
use crate::model;
use anyhow::Context;
use hone::data::Message;
use hone::generate::{generate_batch, GenerateConfig};
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::{LoadOptions, Nf4Options};
use std::path::PathBuf;

/// The decoding flags `hone generate` and `hone compare` share.
#[derive(clap::Args, Clone, Debug)]
pub struct Sampling {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only from the k most likely tokens [default: all].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p [default: 1, all].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Divide the logits of tokens already present by this (transformers' repetition_penalty; 1 is off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampler (and of compare's blind shuffle).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Sampling {
    pub fn config(&self, max_new_tokens: usize, stop_ids: Vec<u32>) -> GenerateConfig {
        GenerateConfig { max_new_tokens, temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, repetition_penalty: self.repetition_penalty, seed: self.seed, stop_ids }
    }

    /// How the replies were decoded, for a report.
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            "greedy".into()
        } else {
            format!("temperature {}, top-k {:?}, top-p {:?}, repetition penalty {}, seed {}", self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a GGUF file or a Hub id [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter to apply [default: none, the base alone].
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt: a user turn of the chat template, or raw text with --raw (or give --prompts).
    #[arg(long, required_unless_present = "prompts")]
    prompt: Option<String>,
    /// Generate for every user turn in a JSONL file (`{"messages": …}` or `{"prompt": …}`),
    /// printing one JSON line `{"prompt", "reply"}` each; the model is loaded once.
    #[arg(long, conflicts_with = "prompt")]
    prompts: Option<PathBuf>,
    /// With --prompts: prompts decoded together, one token each per step (batched decoding).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Most tokens to generate per reply.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: Sampling,
    /// Use the prompt as it is, not as a user turn of the chat template.
    #[arg(long)]
    raw: bool,
    /// Quantize the base to NF4 while loading (as when it was trained with QLoRA).
    #[arg(long)]
    nf4: bool,
    /// Print the new token ids instead of the text.
    #[arg(long)]
    ids: bool,
    /// Keep generating past end-of-turn and EOS tokens (up to --max-new-tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Where to compute: cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

/// The user prompts of a JSONL file: each line's first user message, or its `prompt`.
fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        let prompt = v["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .or_else(|| v["prompt"].as_str())
            .with_context(|| format!("{}:{}: no user message or prompt", path.display(), i + 1))?;
        out.push(prompt.to_string());
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = model::resolve(a.model.as_deref())?;
    let text = model::text(&path)?;
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => read_prompts(file)?,
        (None, None) => anyhow::bail!("give --prompt or --prompts"),
    };
    let encode = |prompt: &str| -> anyhow::Result<Vec<u32>> {
        Ok(if a.raw {
            text.tokenizer.encode(prompt, true)?
        } else {
            let template = text.template.as_ref().context("this model has no chat template; use --raw")?;
            let rendered = template.render(&[Message { role: "user".into(), content: prompt.to_string() }], true)?;
            text.tokenizer.encode(&rendered.text, false)?
        })
    };
    let encoded = prompts.iter().map(|p| encode(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = a.sampling.config(a.max_new_tokens, if a.ignore_eos { Vec::new() } else { text.stop_ids.clone() });
    let new = with_backend!(a.backend, |B, device| {
        let mut m = model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
        if let Some(dir) = &a.adapter {
            Adapter::read(&Dir(dir.clone()))?.attach(m.linears_mut())?;
        }
        let started = std::time::Instant::now();
        let new = generate_batch(&m, &encoded, &cfg, a.batch_size);
        let (count, secs) = (new.iter().map(Vec::len).sum::<usize>(), started.elapsed().as_secs_f64());
        eprintln!("generated {count} tokens in {secs:.2}s: {:.1} tokens/s (prompt processing included)", count as f64 / secs);
        new
    });
    for (prompt, new) in prompts.iter().zip(&new) {
        let reply = text.tokenizer.decode(new, true)?.trim().to_string();
        if a.prompts.is_some() {
            println!("{}", serde_json::json!({"prompt": prompt, "reply": reply}));
        } else if a.ids {
            println!("{}", new.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        } else {
            println!("{reply}");
        }
    }
    Ok(())
}
