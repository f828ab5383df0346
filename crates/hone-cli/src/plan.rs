//! `hone plan`: the memory a fine-tune needs, from the model's config alone (no weights read),
//! so a big job can be sized before it starts; and the check `hone train` makes with it.

use crate::backend::BackendKind;
use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::model::Config;
use hone::train::plan::{human, plan, Device, MemoryPlan, PlanOptions};
use hone::train::RunSettings;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory (only config.json is read), a config.json file, or a GGUF file
    /// (only its header).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// all-linear, a comma-separated list, or a regex.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per sequence (the longest in a batch).
    #[arg(long, alias = "seq-len", default_value_t = 512)]
    max_len: usize,
    /// nf4 (QLoRA) or none.
    #[arg(long, default_value = "nf4")]
    quantize: String,
    /// Activation checkpointing per decoder layer: on (the default) or off.
    #[arg(long, default_value = "on")]
    checkpointing: String,
    /// Where it would run: codes take twice the room on the CPU backend.
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendKind,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

/// The config of a model directory, a GGUF file, or a config.json file itself.
pub fn read_config(path: &Path) -> anyhow::Result<Config> {
    Ok(if path.extension().is_some_and(|e| e == "json") {
        Config::from_json(&std::fs::read(path)?, &path.display().to_string())?
    } else if path.is_file() {
        hone::model::gguf::config_from_gguf(&Gguf::open(Box::new(FileSource::open(path)?))?)?
    } else {
        hone::model::load::read_config(&Dir(path.to_path_buf()))?
    })
}

pub fn device(kind: BackendKind) -> Device {
    match kind {
        BackendKind::Cpu => Device::Cpu,
        BackendKind::Wgpu | BackendKind::Cuda => Device::Gpu,
    }
}

/// The plan for a run with these settings whose longest sequence is `seq` tokens.
pub fn for_run(config: &Config, s: &RunSettings, seq: usize, backend: BackendKind) -> anyhow::Result<MemoryPlan> {
    let cfg = s.train(0)?;
    let batch = match (cfg.pack_len, cfg.max_batch_tokens) {
        (_, Some(budget)) => budget.div_ceil(seq.max(1)),
        _ => cfg.batch_size,
    };
    let o = PlanOptions { batch, seq, nf4: s.nf4()?.is_some(), checkpointing: cfg.checkpointing, device: device(backend), logits_chunk: cfg.logits_chunk };
    Ok(plan(config, &s.lora(), &o))
}

pub fn print(p: &MemoryPlan) {
    let row = |what: &str, b: u64| println!("  {what:<44} {:>10}", human(b));
    row("NF4 codes of the decoder linears", p.nf4_codes_bytes);
    row("NF4 statistics (absmax per 64)", p.nf4_stats_bytes);
    row("unquantized: embeddings, lm_head, norms", p.dense_bytes);
    row(&format!("LoRA weights ({} params)", p.lora_params), p.lora_weight_bytes);
    row("LoRA gradients", p.lora_grad_bytes);
    row("optimizer state (AdamW moments)", p.optimizer_bytes);
    row(if p.checkpointing { "activations (layer inputs + one layer)" } else { "activations (every layer)" }, p.activation_bytes);
    row(if p.checkpointing { "logits and gradient (one chunk)" } else { "logits and gradient" }, p.logits_bytes);
    row("workspace (a dequantized linear; process)", p.workspace_bytes);
    row("total", p.total_bytes);
    println!("  largest single buffer: {} ({})", human(p.largest_buffer_bytes), p.largest_buffer);
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = crate::model::resolve(a.model.as_deref())?;
    let config = read_config(&path)?;
    let settings = RunSettings {
        rank: Some(a.rank),
        targets: Some(a.targets.clone()),
        quantize: Some(a.quantize.clone()),
        checkpointing: Some(a.checkpointing.clone()),
        batch_size: Some(a.batch_size),
        ..Default::default()
    };
    let p = for_run(&config, &settings, a.max_len, a.backend)?;
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    println!("{} ({}, {} layers, hidden {}, vocab {})", path.display(), config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size);
    println!("  QLoRA r={} {}, batch {} × {} tokens, checkpointing {}, on {:?}", a.rank, a.targets, a.batch_size, a.max_len, a.checkpointing, a.backend);
    print(&p);
    Ok(())
}

/// Memory the OS would still give this process (Linux: MemAvailable), if known.
pub fn available_host_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// This process's peak resident memory (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
