//! `hone plan`: the memory a fine-tune needs, from the model's config alone (no weights read),
//! so a big job can be sized before it starts; and the check `hone train` makes with it.

use crate::backend::BackendKind;
use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::model::Config;
use hone::train::plan::{balance_layers, human, plan, split_layers, Device, DeviceMap, MemoryPlan, PlanOptions};
use hone::train::RunSettings;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory (only config.json is read), a config.json file, a GGUF file (only its header), or a Hub id (only its config.json is downloaded) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    model: Option<PathBuf>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// all-linear, a comma-separated list, or a regex.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per sequence (the longest in a batch).
    #[arg(long, alias = "seq-len", default_value_t = 512)]
    max_len: usize,
    /// nf4 (QLoRA) or none.
    #[arg(long, default_value = "nf4")]
    quantize: String,
    /// Activation checkpointing per decoder layer: on or off.
    #[arg(long, default_value = "on")]
    checkpointing: String,
    /// Optimizer: adamw (f32 moments) or adamw_8bit (bitsandbytes' 8-bit moments).
    #[arg(long, default_value = "adamw")]
    optim: String,
    /// sft, or dpo / orpo (two sequences, chosen and rejected, per pair of the batch).
    #[arg(long, default_value = "sft")]
    method: String,
    /// Where it would run: codes take twice the room on the CPU backend.
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendKind,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// Split the layers over this many GPUs of one host, balanced by memory [default: 1].
    #[arg(long)]
    devices: Option<usize>,
    /// Memory per device (e.g. 40GB, 24GiB): the layers fill the devices in turn [default: balance by the plan].
    #[arg(long)]
    max_memory: Option<String>,
    /// Data parallelism: N peers per process (`hone train --data-parallel N`), each with
    /// --batch-size: prints each process's memory and what the peers exchange per step [default: 1].
    #[arg(long)]
    data_parallel: Option<usize>,
    /// Data parallelism across M processes or hosts (`hone train --nodes M`) [default: 1].
    #[arg(long)]
    nodes: Option<usize>,
}

/// What data-parallel peers add to a one-peer plan.
#[derive(serde::Serialize)]
pub struct DataParallelPlan {
    /// Peers in all (per node × nodes).
    pub peers: usize,
    pub nodes: usize,
    /// One process (node) with its N peers on one device: the frozen weights once, each
    /// peer's LoRA tensors, gradients, moments, activations and logits.
    pub per_node_bytes: u64,
    /// A peer alone on its device: the one-peer plan.
    pub per_peer_bytes: u64,
    /// What each peer sends, and receives back summed, every step: every LoRA gradient and the
    /// loss, f32.
    pub all_reduce_bytes: u64,
    /// Across nodes: what peer 0 (on node 0) receives, and sends, every step.
    pub hub_bytes: u64,
}

pub fn data_parallel(p: &MemoryPlan, per_node: usize, nodes: usize) -> DataParallelPlan {
    let (n, m) = (per_node.max(1) as u64, nodes.max(1) as u64);
    let own = p.lora_bytes + p.activation_bytes + p.logits_bytes;
    let all_reduce_bytes = 4 * (p.lora_params + 1);
    DataParallelPlan {
        peers: (n * m) as usize,
        nodes: m as usize,
        per_node_bytes: p.total_bytes + (n - 1) * own,
        per_peer_bytes: p.total_bytes,
        all_reduce_bytes,
        hub_bytes: if m > 1 { (n * m - 1) * all_reduce_bytes } else { 0 },
    }
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

/// Whether an untied embedding table stays in host memory, as the GPU backends keep it
/// (`HoneBackend::tables_on_host`, `HONE_TABLES_ON_DEVICE` to keep it on the device).
fn host_tables(kind: BackendKind) -> bool {
    device(kind) == Device::Gpu && std::env::var_os("HONE_TABLES_ON_DEVICE").is_none()
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
        // DPO: two sequences (chosen, rejected) per pair. Its reference is computed once, before
        // training, by a forward pass without gradients: smaller than a training step.
        _ if cfg.dpo.is_some() => 2 * cfg.batch_size,
        _ => cfg.batch_size,
    };
    let o = PlanOptions { batch, seq, nf4: s.nf4()?.is_some(), checkpointing: cfg.checkpointing, device: device(backend), logits_chunk: cfg.logits_chunk, optim: cfg.optim, min_8bit_size: cfg.min_8bit_size, host_tables: host_tables(backend) };
    Ok(plan(config, &s.lora(), &o))
}

pub fn print(p: &MemoryPlan) {
    let row = |what: &str, b: u64| println!("  {what:<44} {:>10}", human(b));
    row("NF4 codes of the decoder linears", p.nf4_codes_bytes);
    row("NF4 statistics (8-bit absmax per 64, scales)", p.nf4_stats_bytes);
    row("unquantized: embeddings, lm_head, norms", p.dense_bytes);
    row(&format!("LoRA weights ({} params)", p.lora_params), p.lora_weight_bytes);
    row("LoRA gradients", p.lora_grad_bytes);
    row(if p.optim == hone::train::optim::Optim::AdamW8bit { "optimizer state (8-bit AdamW moments)" } else { "optimizer state (AdamW moments)" }, p.optimizer_bytes);
    row(if p.checkpointing { "activations (layer inputs + one layer)" } else { "activations (every layer)" }, p.activation_bytes);
    row(if p.checkpointing { "logits and gradient (one chunk)" } else { "logits and gradient" }, p.logits_bytes);
    row("workspace (unpacked chunks of weights; process)", p.workspace_bytes);
    row("total", p.total_bytes);
    if p.host_table_bytes > 0 {
        row("in host memory: model.embed_tokens (not in total)", p.host_table_bytes);
    }
    println!("  largest single buffer: {} ({})", human(p.largest_buffer_bytes), p.largest_buffer);
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = match a.model.as_deref() {
        Some(m) => crate::hub::config_path(m)?,
        None => crate::model::resolve(None)?,
    };
    let config = read_config(&path)?;
    let settings = RunSettings {
        rank: Some(a.rank),
        targets: Some(a.targets.clone()),
        quantize: Some(a.quantize.clone()),
        checkpointing: Some(a.checkpointing.clone()),
        batch_size: Some(a.batch_size),
        optim: Some(a.optim.clone()),
        method: Some(a.method.clone()),
        ..Default::default()
    };
    let p = for_run(&config, &settings, a.max_len, a.backend)?;
    let (per_node, nodes) = (a.data_parallel.unwrap_or(1).max(1), a.nodes.unwrap_or(1).max(1));
    let dp = (per_node * nodes > 1).then(|| data_parallel(&p, per_node, nodes));
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        if let Some(dp) = &dp {
            v["data_parallel"] = serde_json::to_value(dp)?;
        }
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("{} ({}, {} layers, hidden {}, vocab {})", path.display(), config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size);
    let batch = if settings.dpo()?.is_some() { format!("{} pairs (2 × {} sequences)", a.batch_size, a.batch_size) } else { a.batch_size.to_string() };
    println!("  QLoRA r={} {}, batch {batch} × {} tokens, checkpointing {}, {}, on {:?}", a.rank, a.targets, a.max_len, a.checkpointing, settings.optim()?.name(), a.backend);
    print(&p);
    if let Some(dp) = &dp {
        println!("  data parallel, {} peers on {} node(s) ({} sequences per step):", dp.peers, dp.nodes, dp.peers * a.batch_size);
        println!("    {:<46} {:>10}", format!("each node: {per_node} peer(s) in one process, one device"), human(dp.per_node_bytes));
        println!("    {:<46} {:>10}", "a peer alone on its device", human(dp.per_peer_bytes));
        println!("    {:<46} {:>10}", "each peer sends, and gets back summed, per step", human(dp.all_reduce_bytes));
        if dp.nodes > 1 {
            println!("    {:<46} {:>10}", "node 0 receives, and sends, per step", human(dp.hub_bytes));
        }
    }
    if let Some(m) = device_map(&config, &settings, a.max_len, a.backend, a.devices, a.max_memory.as_deref())? {
        print_map(&m);
    }
    Ok(())
}

/// Bytes from `40GB`, `24GiB`, `512MB` or a plain number.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => anyhow::bail!("--max-memory {text}: unknown unit {other:?} (use GB, GiB, MB, ...)"),
    };
    let n: f64 = number.parse().map_err(|_| anyhow::anyhow!("--max-memory {text}: expected a size such as 40GB"))?;
    Ok((n * scale) as u64)
}

/// The layers over `devices` GPUs: filled in turn up to `max_memory` each, or balanced.
/// `None` for one device without a limit (the ordinary single-device run).
pub fn device_map(config: &Config, s: &RunSettings, seq: usize, backend: BackendKind, devices: Option<usize>, max_memory: Option<&str>) -> anyhow::Result<Option<DeviceMap>> {
    let n = devices.unwrap_or(1);
    if n == 0 {
        anyhow::bail!("--devices 0: at least one device");
    }
    if n == 1 && max_memory.is_none() {
        return Ok(None);
    }
    if matches!(backend, BackendKind::Cpu) {
        anyhow::bail!("--devices and --max-memory place layers on GPUs: use --backend cuda or wgpu");
    }
    let cfg = s.train(0)?;
    let o = PlanOptions { batch: cfg.batch_size, seq, nf4: s.nf4()?.is_some(), checkpointing: cfg.checkpointing, device: Device::Gpu, logits_chunk: cfg.logits_chunk, optim: cfg.optim, min_8bit_size: cfg.min_8bit_size, host_tables: host_tables(backend) };
    Ok(Some(match max_memory {
        Some(m) => split_layers(config, &s.lora(), &o, &vec![parse_size(m)?; n]).map_err(|e| anyhow::anyhow!("{e}; add devices or lower --batch-size / --max-len"))?,
        None => balance_layers(config, &s.lora(), &o, n),
    }))
}

/// Layers split as evenly as counts go (when the plan is overridden).
pub fn even_split(layers: usize, devices: usize) -> DeviceMap {
    let n = devices.max(1);
    DeviceMap { layer_device: (0..layers).map(|i| i * n / layers.max(1)).collect(), device_bytes: vec![0; n] }
}

pub fn print_map(m: &DeviceMap) {
    println!("  device map:");
    for (d, bytes) in m.device_bytes.iter().enumerate() {
        let layers: Vec<usize> = (0..m.layer_device.len()).filter(|&i| m.layer_device[i] == d).collect();
        let span = match (layers.first(), layers.last()) {
            (Some(a), Some(b)) => format!("layers {a}..={b}"),
            _ => "no layers".to_string(),
        };
        let extra = [(d == 0).then_some("embeddings"), (d + 1 == m.device_bytes.len()).then_some("norm and head")].into_iter().flatten().collect::<Vec<_>>().join(", ");
        println!("    device {d}: {span}{}{}  {}", if extra.is_empty() { "" } else { ", " }, extra, human(*bytes));
    }
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
