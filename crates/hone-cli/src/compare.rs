//! `hone compare`: the base model and each adapter on held-out data, side by side — loss and
//! perplexity on the held-out completions, a reply generated for every held-out prompt and
//! scored against its reference (hone::score), perplexity on general text before and after
//! (forgetting), and a report as JSON, Markdown and one self-contained HTML file, with an
//! optional blind review sheet.

use crate::backend::{with_backend, BackendKind};
use crate::model;
use anyhow::Context;
use hone::compare::{general_samples, Comparison, HeldOut, Measured, GENERAL};
use hone::data::dataset::parse_jsonl;
use hone::data::table::Columns;
use hone::generate::generate_batch;
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::{LoadOptions, Nf4Options};
use hone::score::Check;
use hone::train::trainer::evaluate;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The base model: a Hugging Face directory, a GGUF file or a Hub id [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter to compare with the base (repeat for several) [default: none, the base alone].
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Held-out data (prompt/completion or chat rows; JSONL, CSV, Parquet or a Hub dataset id).
    #[arg(long)]
    data: PathBuf,
    /// With a Hub dataset id as --data: the split [default: test, else validation].
    #[arg(long)]
    split: Option<String>,
    /// Rename the data's columns: `prompt=question,completion=answer` [default: as they are].
    #[arg(long)]
    columns: Option<String>,
    /// Where the report goes (report.html, report.md, report.json; with --blind, review.html and
    /// review-key.json) [default: compare-report].
    #[arg(long, default_value = "compare-report")]
    out: PathBuf,
    /// Text whose perplexity before and after shows forgetting, one passage per line [default:
    /// a bundled public-domain sample].
    #[arg(long)]
    general: Option<PathBuf>,
    /// A pass/fail check of each reply: `json`, or `regex:PATTERN` (repeatable) [default: none].
    #[arg(long)]
    check: Vec<String>,
    /// Generate for at most this many held-out prompts [default: all].
    #[arg(long)]
    limit: Option<usize>,
    /// Prompts decoded together, one token each per step (batched decoding).
    #[arg(long, default_value_t = 8)]
    gen_batch_size: usize,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: crate::generate::Sampling,
    /// Tokens per held-out sample for the loss; longer ones are truncated [default: no limit].
    #[arg(long)]
    max_len: Option<usize>,
    /// Sequences per batch for the loss.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Quantize the base to NF4 while loading (as it was trained with QLoRA).
    #[arg(long)]
    nf4: bool,
    /// Also write review.html: the samples with the replies in a shuffled order under letters, for
    /// a person to judge without knowing which model wrote which; the key in review-key.json.
    #[arg(long)]
    blind: bool,
    /// Where to compute: cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = model::resolve(a.model.as_deref())?;
    let text = model::text(&path)?;
    let (tok, template) = (&text.tokenizer, text.template.as_ref());
    let checks = a.check.iter().map(|c| Check::parse(c)).collect::<hone::Result<Vec<_>>>()?;
    let columns = Columns::parse(a.columns.as_deref().unwrap_or("")).map_err(|e| anyhow::anyhow!("--columns: {e}"))?;

    // Held-out rows: the loss samples and, for rows with a reference, the prompt to generate from.
    let splits = match &a.split {
        Some(s) => vec![s.clone()],
        None => vec!["test".into(), "validation".into()],
    };
    let data = crate::train::DataArg { arg: &a.data, splits };
    let mut examples = Vec::new();
    for file in data.files()? {
        let jsonl = crate::train::read_dataset(&file, &columns)?;
        examples.extend(parse_jsonl(&jsonl, &file.display().to_string(), None, false)?.0);
    }
    let held = HeldOut::new(&examples, &a.data.display().to_string(), tok, template, a.max_len, a.limit)?;
    let general_text = match &a.general {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => GENERAL.to_string(),
    };

    let cfg = a.sampling.config(a.max_new_tokens, text.stop_ids.clone());
    let names: Vec<(String, Option<PathBuf>)> = std::iter::once(("base".to_string(), None))
        .chain(a.adapter.iter().map(|p| (p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string()), Some(p.clone()))))
        .collect();
    let mut comparison = Comparison::new(&held, checks);
    let prompt_ids = held.prompt_ids();
    // The base is loaded once; each variant starts from it with every adapter removed.
    let measured: Vec<Measured> = with_backend!(a.backend, |B, device| {
        let mut m = model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
        let general = general_samples(&general_text, tok, template, a.max_len, m.config.max_position_embeddings)?;
        let mut out = Vec::new();
        for (name, adapter) in &names {
            eprintln!("compare: {name}: loss on {} held-out samples, {} replies, general text", held.samples.len(), prompt_ids.len());
            for (_, l) in m.linears_mut() {
                l.lora = None;
            }
            if let Some(dir) = adapter {
                Adapter::read(&Dir(dir.clone()))?.attach(m.linears_mut())?;
            }
            let held_out = evaluate(&m, &held.samples, a.batch_size, 0, &device);
            let general = evaluate(&m, &general, a.batch_size, 0, &device);
            let started = std::time::Instant::now();
            let replies = generate_batch(&m, &prompt_ids, &cfg, a.gen_batch_size);
            let m = Measured { held_out, general, replies, seconds: started.elapsed().as_secs_f64() };
            let (generated, rate) = m.generated();
            eprintln!("compare: {name}: {generated} tokens generated in {:.1}s, {rate:.1} tokens/s ({} prompts per batch)", m.seconds, a.gen_batch_size);
            out.push(m);
        }
        out
    });
    for ((name, adapter), m) in names.iter().zip(&measured) {
        comparison.add(name, adapter.as_ref().map(|p| p.display().to_string()), m, tok)?;
    }
    let report = comparison.report(
        a.model.as_ref().map(|m| m.display().to_string()).unwrap_or_else(|| path.display().to_string()),
        a.data.display().to_string(),
        a.general.as_ref().map(|g| g.display().to_string()).unwrap_or_else(|| "bundled public-domain sample".into()),
        a.sampling.describe(),
        a.max_new_tokens,
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for (name, bytes) in report.files(a.blind.then_some(a.sampling.seed)) {
        let file = a.out.join(name);
        crate::logits::write_atomic(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
    }
    print!("{}", report.summary());
    eprintln!("wrote {}", a.out.join("report.html").display());
    Ok(())
}
