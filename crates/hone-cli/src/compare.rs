//! `hone compare`: the base model and each adapter on held-out data, side by side — loss and
//! perplexity on the held-out completions, a reply generated for every held-out prompt and
//! scored against its reference (hone::score), perplexity on general text before and after
//! (forgetting), and a report as JSON, Markdown and one self-contained HTML file, with an
//! optional blind review sheet.

mod report;

use crate::backend::{with_backend, BackendKind};
use crate::model;
use anyhow::Context;
use hone::data::dataset::{encode, parse_jsonl, prompt_and_reference, EncodeOptions, Example};
use hone::data::table::Columns;
use hone::data::Sample;
use hone::generate::generate;
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::{LoadOptions, Nf4Options};
use hone::score::{score, Check};
use hone::train::trainer::evaluate;
use report::{Report, Row, Variant};
use std::path::PathBuf;

/// Bundled general text (public-domain prose) for the forgetting figure.
const GENERAL: &str = include_str!("../../../data/general/public_domain.txt");

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
    let eos = template.and_then(|t| t.eos_token.clone());
    let opts = EncodeOptions { train_on_completions_only: true, max_len: a.max_len };
    let samples = examples.iter().map(|e| encode(e, tok, template, eos.as_deref(), opts)).collect::<hone::Result<Vec<Sample>>>()?;
    hone::train::run::require_eval_targets(&samples, &a.data.display().to_string())?;
    let mut prompts = Vec::new();
    for e in &examples {
        if let Some((ids, reference)) = prompt_and_reference(e, tok, template)? {
            prompts.push((ids, prompt_text(e), reference));
        }
    }
    anyhow::ensure!(!prompts.is_empty(), "{}: no row has a prompt and a reference (prompt/completion rows, or chats ending with an assistant turn)", a.data.display());
    prompts.truncate(a.limit.unwrap_or(usize::MAX));

    let general_text = match &a.general {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => GENERAL.to_string(),
    };
    let general_opts = EncodeOptions { train_on_completions_only: false, max_len: Some(a.max_len.unwrap_or(256)) };
    let general = general_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| encode(&Example::Text(l.to_string()), tok, template, None, general_opts))
        .collect::<hone::Result<Vec<_>>>()?;

    let cfg = a.sampling.config(a.max_new_tokens, text.stop_ids.clone());
    let names: Vec<(String, Option<PathBuf>)> = std::iter::once(("base".to_string(), None))
        .chain(a.adapter.iter().map(|p| (p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string()), Some(p.clone()))))
        .collect();
    let mut variants = Vec::new();
    let mut replies: Vec<Vec<String>> = vec![Vec::new(); prompts.len()];
    for (name, adapter) in &names {
        eprintln!("compare: {name}: loss on {} held-out samples, {} replies, general text", samples.len(), prompts.len());
        let (held_out, general_report, new, secs) = with_backend!(a.backend, |B, device| {
            // One load per variant: attaching a second adapter over a first is not undone cleanly.
            let mut m = model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
            if let Some(dir) = adapter {
                Adapter::read(&Dir(dir.clone()))?.attach(m.linears_mut())?;
            }
            let held_out = evaluate(&m, &samples, a.batch_size, 0, &device);
            let general_report = evaluate(&m, &general, a.batch_size, 0, &device);
            let started = std::time::Instant::now();
            let new: Vec<Vec<u32>> = prompts.iter().map(|(ids, _, _)| generate(&m, ids, &cfg, &device)).collect();
            (held_out, general_report, new, started.elapsed().as_secs_f64())
        });
        let generated: usize = new.iter().map(Vec::len).sum();
        let mut scores = Vec::new();
        for (i, ids) in new.iter().enumerate() {
            let reply = tok.decode(ids, true)?.trim().to_string();
            scores.push(score(&reply, &prompts[i].2, &checks));
            replies[i].push(reply);
        }
        variants.push(Variant::new(name, adapter.as_deref(), &held_out, &general_report, &scores, generated as f64 / secs.max(1e-9)));
    }
    let rows = prompts.iter().zip(replies).map(|((_, prompt, reference), replies)| Row { prompt: prompt.clone(), reference: reference.clone(), replies }).collect();
    let report = Report {
        model: a.model.as_ref().map(|m| m.display().to_string()).unwrap_or_else(|| path.display().to_string()),
        data: a.data.display().to_string(),
        general: a.general.as_ref().map(|g| g.display().to_string()).unwrap_or_else(|| "bundled public-domain sample".into()),
        checks: checks.iter().map(Check::name).collect(),
        decoding: a.sampling.describe(),
        max_new_tokens: a.max_new_tokens,
        variants,
        rows,
    };
    report.write(&a.out, a.blind.then_some(a.sampling.seed))?;
    print!("{}", report.summary());
    eprintln!("wrote {}", a.out.join("report.html").display());
    Ok(())
}

/// The prompt as a person reads it in the report: the user's last turn, or the prompt text.
fn prompt_text(e: &Example) -> String {
    match e {
        Example::Text(t) => t.clone(),
        Example::Completion { prompt, .. } => prompt.clone(),
        Example::Chat(m) => m.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default(),
    }
}
