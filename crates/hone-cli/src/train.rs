//! `hone train` and `hone eval`.

use crate::backend::{with_backend, BackendKind};
use hone::train::data_parallel::DataParallel;
use anyhow::{bail, Context};
use hone::data::dataset::EncodeOptions;
use hone::data::table::{csv_to_jsonl, rename_jsonl, Columns, TableKind};
use hone::data::{ChatTemplate, Format, Sample, Tokenizer};
use hone::io::Dir;
use hone::lora::init::Init;
use hone::lora::peft::{add_adapters, Adapter};
use hone::lora::{LoraConfig, Targets};
use hone::model::CausalLm;
use hone::model::{LoadOptions, Nf4Options, Placement};
use hone::train::plan::DeviceMap;
use hone::ops::HoneBackend;
use hone::train::checkpoint::{self, adapter_files, write_dir_atomic, SavedState};
use hone::train::trainer::evaluate;
use hone::data::preference::Sequence;
use hone::train::preference::{evaluate_preference, pair_logps, DpoMetrics, LossType};
use hone::train::run::{self, pad_id, pairs_from_jsonl, samples_from_jsonl, RunSettings};
use hone::train::{Schedule, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `hone train`'s flags: the run's settings, shared with the page, and where things are. Flags
/// override the TOML file given with `--config`, whose keys are the flags' long names with `_`
/// for `-`.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// Base model: a Hugging Face directory, a GGUF file, or a Hub id (org/name[@revision][:FILE],
    /// from the Hugging Face cache, downloaded when missing) [default: SmolLM2-135M-Instruct, fetched by `cargo xtask default-model`].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: JSONL, CSV or Parquet, or a Hub dataset id (org/name[@revision], its
    /// --split from the Hugging Face cache, downloaded when missing) (required, here or in --config).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where the PEFT adapter is written, created atomically; must not exist unless resuming (required, here or in --config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Held-out data, as --data [default: none; --eval-split of the training data if set].
    /// A Hub dataset id here reads its validation split (else its test split).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// With a Hub dataset id as --data: the split to train on [default: train].
    #[arg(long)]
    pub split: Option<String>,
    #[command(flatten)]
    #[serde(skip)]
    pub run: RunSettings,
    /// Where to compute: cpu, wgpu (Vulkan/Metal/DX12) or cuda [default: cpu].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// A TOML file with any of these settings (its keys are the flags' names with _ for -); flags win [default: none].
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// base_model_name_or_path in adapter_config.json, e.g. a Hub id [default: --model as given].
    #[arg(long)]
    pub base_model_name: Option<String>,
    /// Start from this PEFT LoRA adapter (its rank, alpha and layers; for DPO it is also the
    /// reference, as TRL's frozen copy) instead of a new one [default: a new adapter].
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data parallelism: N peers in this process, each with its own micro-batch of --batch-size
    /// (a step's batch is N × --batch-size × --grad-accum), their LoRA gradients all-reduced
    /// every step by burn's collective engine; a resume needs the same N [default: 1].
    #[arg(long)]
    pub data_parallel: Option<usize>,
    /// Data parallelism across processes or hosts: how many nodes (each runs `hone train` with
    /// the same flags and data, and --data-parallel peers of its own) [default: 1].
    #[arg(long)]
    pub nodes: Option<usize>,
    /// With --nodes: this node's place, 0 to N-1. Node 0 hosts the orchestrator, saves the
    /// checkpoints and writes the adapter; the others write nothing.
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// With --nodes: HOST:PORT where node 0 listens for the other nodes' peers (the same on every
    /// node; node 0 needs that port free, the others to reach it).
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// With data parallelism: seconds a peer waits for the others in one step before the run
    /// stops, naming the node that no longer answers [default: 300].
    #[arg(long)]
    pub peer_timeout: Option<u64>,
    /// Continue the run saved in this checkpoint directory [default: start afresh].
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Save a checkpoint every N steps, and on Ctrl-C [default: only on Ctrl-C].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Write the run's series here: TensorBoard event files (`tensorboard --logdir DIR`) and
    /// metrics.jsonl (loss, lr, grad norm, tokens/s; eval loss) [default: none].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Skip (and count) malformed or incomplete lines instead of stopping.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_lines: bool,
    /// No progress bar; one line per step.
    #[arg(long)]
    #[serde(default)]
    pub quiet: bool,
    /// Start even when the memory plan says the run will not fit.
    #[arg(long)]
    #[serde(default)]
    pub ignore_memory_plan: bool,
    /// Split the model's layers over this many GPUs of this host (wgpu or cuda), balanced by the memory plan [default: 1].
    #[arg(long)]
    pub devices: Option<usize>,
    /// Which GPU of --backend this process trains on (wgpu's discrete GPUs or CUDA's devices,
    /// from 0); with --nodes, one process per GPU of a host, as torchrun runs DDP [default: the
    /// backend's default device].
    #[arg(long)]
    pub device: Option<usize>,
    /// With --devices: memory each device may use (e.g. 40GB, 24GiB), filled in turn [default: balance by the plan].
    #[arg(long)]
    pub max_memory: Option<String>,
}

impl TrainArgs {
    fn train_data<'a>(&self, path: &'a Path) -> DataArg<'a> {
        DataArg { arg: path, splits: vec![self.split.clone().unwrap_or_else(|| "train".into())] }
    }
}

fn held_out(path: &Path) -> DataArg<'_> {
    DataArg { arg: path, splits: vec!["validation".into(), "test".into()] }
}

macro_rules! overlay {
    ($base:ident, $top:ident, $($f:ident),*) => { $( if $top.$f.is_some() { $base.$f = $top.$f.clone(); } )* };
}

impl TrainArgs {
    /// The TOML file's settings with the flags on top.
    fn resolve(self) -> anyhow::Result<TrainArgs> {
        let Some(path) = &self.config else { return Ok(self) };
        let text = hone::io::read_text_lines(path, hone::io::MAX_LINE_BYTES)?;
        let invalid = || format!("{}: invalid config", path.display());
        let mut table: toml::Table = toml::from_str(&text).with_context(invalid)?;
        // The run's settings go to RunSettings, the rest (paths, backend) to TrainArgs.
        let run_keys = serde_json::to_value(RunSettings::default())?;
        let run_keys = run_keys.as_object().expect("a struct");
        let run_table: toml::Table = table.iter().filter(|(k, _)| run_keys.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        table.retain(|k, _| !run_keys.contains_key(k));
        let mut base: TrainArgs = table.try_into().with_context(invalid)?;
        base.run = run_table.try_into().with_context(invalid)?;
        let top = self;
        overlay!(base, top, model, data, out, eval_data, split, backend, save_every, log_dir, base_model_name, devices, device, max_memory, adapter, data_parallel, nodes, node_rank, orchestrator, peer_timeout);
        base.run.overlay(&top.run);
        base.skip_bad_lines |= top.skip_bad_lines;
        base.quiet |= top.quiet;
        base.ignore_memory_plan |= top.ignore_memory_plan;
        base.config = top.config;
        base.resume = top.resume;
        Ok(base)
    }
}

struct Data {
    train: Vec<Sample>,
    eval: Vec<Sample>,
    /// With --method dpo: preference pairs (chosen, rejected) instead of samples.
    pairs: Vec<[Sequence; 2]>,
    eval_pairs: Vec<[Sequence; 2]>,
    truncated: usize,
    skipped: usize,
}

impl Data {
    fn longest(&self) -> usize {
        let samples = self.train.iter().chain(&self.eval).map(|s| s.input_ids.len());
        let pairs = self.pairs.iter().chain(&self.eval_pairs).flat_map(|p| p.iter().map(|s| s.ids.len()));
        samples.chain(pairs).max().unwrap_or(1)
    }
}

/// A dataset file's rows as the JSONL the parsers read: JSONL, CSV or Parquet by the file's
/// extension, with `columns` renamed.
pub(crate) fn read_dataset(path: &Path, columns: &Columns) -> anyhow::Result<String> {
    let file = path.display().to_string();
    Ok(match TableKind::of(&file) {
        TableKind::Jsonl => rename_jsonl(&hone::io::read_text_lines(path, hone::io::MAX_LINE_BYTES)?, &file, columns)?,
        TableKind::Csv => csv_to_jsonl(&std::fs::read(path).with_context(|| format!("reading {file}"))?, &file, columns)?,
        TableKind::Parquet => hone::data::table::parquet_to_jsonl(path, columns)?,
    })
}

fn load_pairs(data: &DataArg, columns: &Columns, skip_bad: bool, tok: &Tokenizer, template: Option<&ChatTemplate>, max_len: Option<usize>, loss: LossType) -> anyhow::Result<run::Pairs> {
    let mut all = run::Pairs { pairs: Vec::new(), dropped: 0, skipped: 0 };
    for path in data.files()? {
        let text = read_dataset(&path, columns)?;
        let p = pairs_from_jsonl(&text, &path.display().to_string(), skip_bad, tok, template, max_len, loss)?;
        all.pairs.extend(p.pairs);
        all.dropped += p.dropped;
        all.skipped += p.skipped;
    }
    Ok(all)
}

/// A dataset argument: a file, or a Hub dataset id whose split's files are read in turn.
pub struct DataArg<'a> {
    pub arg: &'a Path,
    /// Splits to try in order for a Hub id (the first one the repository has).
    pub splits: Vec<String>,
}

impl DataArg<'_> {
    pub(crate) fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut last = None;
        for split in &self.splits {
            match crate::hub::dataset_files(self.arg, split) {
                Ok(f) => {
                    if f.len() > 1 || !self.arg.exists() {
                        eprintln!("data: {} split {split}: {} file{}", self.arg.display(), f.len(), if f.len() == 1 { "" } else { "s" });
                    }
                    return Ok(f);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{}: no split to read", self.arg.display())))
    }
}

/// Preference pairs for `--method dpo|orpo`, held out as `--eval-data` or `--eval-split` say.
fn load_preference_data(a: &TrainArgs, path: &Path, tok: &Tokenizer, template: Option<&ChatTemplate>, loss: LossType) -> anyhow::Result<Data> {
    let columns = a.run.columns()?;
    let train = load_pairs(&a.train_data(path), &columns, a.skip_bad_lines, tok, template, a.run.max_len, loss)?;
    let (pairs, eval_pairs, dropped) = match (&a.eval_data, a.run.eval_split) {
        (Some(p), _) => {
            let e = load_pairs(&held_out(p), &columns, a.skip_bad_lines, tok, template, a.run.max_len, loss)?;
            (train.pairs, e.pairs, train.dropped + e.dropped)
        }
        (None, Some(f)) if f > 0.0 && f < 1.0 => {
            let (t, e) = run::split_eval(train.pairs, f, a.run.seed());
            (t, e, train.dropped)
        }
        (None, Some(f)) => bail!("--eval-split {f}: must be between 0 and 1"),
        (None, None) => (train.pairs, Vec::new(), train.dropped),
    };
    eprintln!(
        "data: {} training and {} evaluation preference pairs; {dropped} dropped (the prompt alone reaches --max-len); {} bad lines skipped",
        pairs.len(),
        eval_pairs.len(),
        train.skipped
    );
    Ok(Data { train: Vec::new(), eval: Vec::new(), pairs, eval_pairs, truncated: 0, skipped: train.skipped })
}

/// Samples from a JSONL file; refused when no example keeps a token the loss counts, with a
/// warning when some do not.
fn load_samples(data: &DataArg, columns: &Columns, format: Option<Format>, skip_bad: bool, tok: &Tokenizer, template: Option<&ChatTemplate>, opts: EncodeOptions) -> anyhow::Result<(Vec<Sample>, usize, usize)> {
    let mut s = run::Samples { samples: Vec::new(), truncated: 0, skipped: 0, without_targets: 0, lost_to_max_len: 0 };
    for path in data.files()? {
        let text = read_dataset(&path, columns)?;
        let one = samples_from_jsonl(&text, &path.display().to_string(), format, skip_bad, tok, template, opts)?;
        s.samples.extend(one.samples);
        s.truncated += one.truncated;
        s.skipped += one.skipped;
        s.without_targets += one.without_targets;
        s.lost_to_max_len += one.lost_to_max_len;
    }
    let file = data.arg.display().to_string();
    s.require_targets(&file, opts.max_len)?;
    if let Some(w) = s.warning(&file) {
        eprintln!("warning: {w}");
    }
    Ok((s.samples, s.truncated, s.skipped))
}

pub fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let a = args.resolve()?;
    if (a.data_parallel.unwrap_or(1) > 1 || a.nodes.unwrap_or(1) > 1) && a.run.dpo()?.is_some() {
        bail!("--data-parallel is for SFT runs; DPO and ORPO train on one peer");
    }
    // Checked now, before the model loads.
    nodes_of(&a)?;
    let model_dir = crate::model::resolve(a.model.as_deref())?;
    let data_path = a.data.clone().context("--data is required")?;
    let out = a.out.clone().context("--out is required")?;
    if out.exists() && a.resume.is_none() {
        bail!("{} already exists; choose a new --out (or --resume a checkpoint)", out.display());
    }
    let ckpt = checkpoint_dir(&out);
    if checkpoint::exists(&ckpt) && a.resume.is_none() {
        bail!("{} holds the checkpoint of an interrupted run: continue it with --resume {}, or delete it to start over", ckpt.display(), ckpt.display());
    }
    let format = match &a.run.format {
        Some(f) => Some(Format::parse(f).with_context(|| format!("--format {f}: expected text, completion, chat or alpaca"))?),
        None => None,
    };
    let init = a.run.init()?;
    if init != Init::Default {
        let name = init.name();
        crate::model::require_dir(&model_dir, &format!("--init {name} needs the original 16/32-bit weights, which a GGUF file does not hold"))?;
        anyhow::ensure!(a.adapter.is_none(), "--init {name} starts a new adapter; --adapter continues a given one: use one of them");
        anyhow::ensure!(!a.run.dora, "--init {name} with --dora is not supported yet");
    }
    if init == Init::Loftq {
        anyhow::ensure!(a.run.nf4()?.is_some(), "--init loftq starts the adapter from NF4's quantization error: it is for QLoRA (--quantize nf4), and --quantize none leaves no error");
    }
    let text = crate::model::text(&model_dir)?;
    let (tok, template) = (text.tokenizer, text.template);
    let backend = a.backend.unwrap_or(BackendKind::Cpu);
    if let Some(dpo) = a.run.dpo()? {
        if a.run.format.is_some() || a.run.train_on_prompts {
            bail!("--format and --train-on-prompts are SFT settings; DPO and ORPO read preference pairs (prompt, chosen, rejected)");
        }
        let data = load_preference_data(&a, &data_path, &tok, template.as_ref(), dpo.loss_type)?;
        let map = check_fit(&a, &model_dir, &data, backend)?;
        return with_backend!(backend, |Inner, device| train_with::<burn::backend::Autodiff<Inner>>(&a, data, &model_dir, &out, &tok, device, map));
    }
    let opts = EncodeOptions { train_on_completions_only: !a.run.train_on_prompts, max_len: a.run.max_len };
    let columns = a.run.columns()?;
    let (train, truncated, skipped) = load_samples(&a.train_data(&data_path), &columns, format, a.skip_bad_lines, &tok, template.as_ref(), opts)?;
    let seed = a.run.seed.unwrap_or(42);
    let (train, eval, eval_truncated) = match (&a.eval_data, a.run.eval_split) {
        (Some(p), _) => {
            let (e, t, _) = load_samples(&held_out(p), &columns, format, a.skip_bad_lines, &tok, template.as_ref(), opts)?;
            (train, e, t)
        }
        (None, Some(f)) if f > 0.0 && f < 1.0 => {
            let (t, e) = run::split_eval(train, f, seed);
            run::require_eval_targets(&e, &format!("{} (--eval-split {f})", data_path.display()))?;
            (t, e, 0)
        }
        (None, Some(f)) => bail!("--eval-split {f}: must be between 0 and 1"),
        (None, None) => (train, Vec::new(), 0),
    };
    let data = Data { train, eval, pairs: Vec::new(), eval_pairs: Vec::new(), truncated: truncated + eval_truncated, skipped };
    eprintln!(
        "data: {} training and {} evaluation examples; {} truncated to --max-len; {} bad lines skipped",
        data.train.len(),
        data.eval.len(),
        data.truncated,
        data.skipped
    );
    let map = check_fit(&a, &model_dir, &data, backend)?;
    with_backend!(backend, |Inner, device| train_with::<burn::backend::Autodiff<Inner>>(&a, data, &model_dir, &out, &tok, device, map))
}

/// Refuses a run the plan says cannot fit, before any weight is read: on the CPU against the
/// memory the OS has available. (GPU memory is not queried: burn 0.21 does not report a
/// device's capacity; `hone plan` prints what a GPU run needs.)
/// With --devices or --max-memory, the device map the run will use.
fn check_fit(a: &TrainArgs, model: &Path, data: &Data, backend: BackendKind) -> anyhow::Result<Option<DeviceMap>> {
    let config = crate::plan::read_config(model)?;
    let seq = data.longest();
    let mut p = crate::plan::for_run(&config, &a.run, seq, backend)?;
    if let Some(n) = a.data_parallel.filter(|&n| n > 1) {
        // This process's peers share one device and the frozen weights; each adds its own training state.
        p.total_bytes = crate::plan::data_parallel(&p, n, 1).per_node_bytes;
    }
    eprintln!("plan: {} of memory ({} bytes; sequences up to {seq} tokens; `hone plan` breaks it down)", hone::train::plan::human(p.total_bytes), p.total_bytes);
    let map = crate::plan::device_map(&config, &a.run, seq, backend, a.devices, a.max_memory.as_deref());
    let map = match map {
        Err(e) if a.ignore_memory_plan => {
            eprintln!("{e:#} (--ignore-memory-plan: splitting the layers evenly instead)");
            Some(crate::plan::even_split(config.num_hidden_layers, a.devices.unwrap_or(1)))
        }
        other => other?,
    };
    if let Some(m) = &map {
        crate::plan::print_map(m);
    }
    if let (BackendKind::Cpu, Some(free)) = (backend, crate::plan::available_host_bytes()) {
        if p.total_bytes > free && !a.ignore_memory_plan {
            bail!(
                "this run needs about {} but {} is available (short by {}): lower --batch-size or --max-len, keep --checkpointing on, or pass --ignore-memory-plan",
                hone::train::plan::human(p.total_bytes),
                hone::train::plan::human(free),
                hone::train::plan::human(p.total_bytes - free)
            );
        }
    }
    Ok(map)
}

fn train_with<B>(a: &TrainArgs, data: Data, model_dir: &Path, out: &Path, tok: &Tokenizer, device: B::Device, map: Option<DeviceMap>) -> anyhow::Result<()>
where
    B: burn::tensor::backend::AutodiffBackend + HoneBackend,
    B::InnerBackend: HoneBackend,
{
    let device = match a.device {
        Some(_) if matches!(a.backend.unwrap_or(BackendKind::Cpu), BackendKind::Cpu) => bail!("--device picks a GPU of --backend wgpu or cuda; the CPU backend has one device"),
        Some(_) if a.devices.is_some() => bail!("--device and --devices: pick one GPU, or split the layers over several"),
        Some(k) => {
            let d = crate::backend::sibling::<B>(&device, k);
            crate::backend::probe::<B>(&format!("--device {k}"), &d)?;
            d
        }
        None => device,
    };
    let settings = a.run.clone();
    let nf4 = settings.nf4().map_err(|_| anyhow::anyhow!("--quantize {}: expected nf4 or none", a.run.quantize.as_deref().unwrap_or_default()))?;
    // On a GPU the buffers the plan cannot split must fit the adapter's largest: said by name
    // and size before any weight is read.
    let limit = hone::ops::max_buffer_bytes();
    if limit < u64::MAX {
        let seq = data.longest();
        let p = crate::plan::for_run(&crate::plan::read_config(model_dir)?, &a.run, seq, a.backend.unwrap_or(BackendKind::Cpu))?;
        if p.largest_buffer_bytes > limit {
            bail!(
                "{}: the model does not fit this GPU: {} needs a {} buffer, and its largest is {}",
                model_dir.display(),
                p.largest_buffer,
                hone::train::plan::human(p.largest_buffer_bytes),
                hone::train::plan::human(limit)
            );
        }
    }
    let loading = std::time::Instant::now();
    let init = settings.init()?;
    let pissa = init == Init::Pissa;
    let fresh = settings.lora();
    // LoftQ leaves the base as it is: a resumed run takes its adapter from the checkpoint.
    let computed_init = match init {
        Init::Pissa => true,
        Init::Loftq => a.resume.is_none(),
        Init::Default => false,
    };
    let (mut model, initial) = crate::model::weights_with_init::<B>(
        model_dir,
        LoadOptions { nf4 },
        |layers| match &map {
            Some(m) => crate::backend::placement::<B>(&device, m),
            None => Ok(Placement::single(device.clone(), layers)),
        },
        computed_init.then_some(&fresh),
    )?;
    let device = model.model.embed_tokens.device();
    eprintln!("model: {} loaded in {:.1}s ({})", model_dir.display(), loading.elapsed().as_secs_f64(), if nf4.is_some() { "NF4 base, QLoRA" } else { "f32 base, LoRA" });
    let lora = match &a.adapter {
        Some(dir) => start_adapter(dir, &a.run, &mut model)?,
        None => {
            let lora = fresh;
            if add_adapters(model.linears_mut(), &lora) == 0 {
                bail!("--targets {:?} matches no layer of this model", a.run.targets.as_deref().unwrap_or("all-linear"));
            }
            if let Some(initial) = &initial {
                initial.attach(model.linears_mut())?;
                match init {
                    Init::Pissa => eprintln!("PiSSA: {} layers start from their weights' top {} singular directions; the base is the residual", initial.layers.len(), lora.r),
                    _ => {
                        eprintln!("LoftQ: {} layers start from the top {} singular directions of their NF4 error", initial.layers.len(), lora.r);
                        if (lora.scaling() - 1.0).abs() > 1e-12 {
                            eprintln!("LoftQ: as in PEFT, A and B are not divided by the scale alpha/r = {}, so the model starts at NF4(W) + {}·(its error's rank-{} part); --alpha equal to --rank starts nearest W", lora.scaling(), lora.scaling(), lora.r);
                        }
                    }
                }
            }
            lora
        }
    };
    if let Some(s) = a.run.schedule.as_deref() {
        Schedule::parse(s).with_context(|| format!("--schedule {s}: expected constant, linear or cosine"))?;
    }
    let cfg = settings.train(pad_id(tok))?;
    let eval_samples = data.eval;
    let devices = model.devices();
    report_device_memory::<B>(&devices, "after loading");
    let loaded = match &a.resume {
        Some(dir) => Some(checkpoint::load(dir).with_context(|| format!("resuming from {}", dir.display()))?),
        None => None,
    };
    let dpo = cfg.dpo.is_some();
    // Peers in this process, and in all.
    let nodes = nodes_of(a)?;
    let local = a.data_parallel.unwrap_or(1).max(1);
    let peers = local * nodes.as_ref().map_or(1, |n| n.count);
    let timeout = std::time::Duration::from_secs(a.peer_timeout.unwrap_or(hone::train::data_parallel::DEFAULT_TIMEOUT.as_secs()));
    let peer = |local_rank: usize| {
        match &nodes {
            Some(n) => DataParallel::across(n.clone(), local_rank, local),
            None => DataParallel::new(local_rank, local),
        }
        .with_timeout(timeout)
    };
    // Only node 0 saves: every node holds the same adapter after each step.
    let writes = nodes.as_ref().is_none_or(|n| n.rank == 0);
    if peers > 1 && dpo {
        bail!("--data-parallel is for SFT runs; DPO and ORPO train on one peer");
    }
    // Across nodes a peer may split its layers over this host's GPUs (its sums meet in host
    // memory); peers of one process share one device.
    if local > 1 && devices.len() > 1 {
        bail!("--data-parallel N (N > 1) with layers placed on several devices (--devices) is not supported: the peers of one process share one device; with --nodes, each node may split its one peer's layers over its GPUs");
    }
    let mut helper_start = None;
    let needs_reference = cfg.dpo.is_some_and(|d| d.loss_type.needs_reference());
    let mut trainer = if dpo {
        let started = std::time::Instant::now();
        let saved_reference = loaded.as_ref().map(|l| l.saved.reference_logps.clone()).filter(|r| !r.is_empty());
        let from_checkpoint = saved_reference.is_some();
        let t = Trainer::new_preference(model, lora.clone(), data.pairs, saved_reference, cfg.clone(), device.clone())?;
        if !from_checkpoint && needs_reference {
            eprintln!("reference: log-probabilities of {} pairs in {:.1}s (the model as it starts, frozen)", t.data_len(), started.elapsed().as_secs_f64());
        }
        t
    } else {
        // Data parallelism: peers 1.. start from the same model (sharing its frozen weights).
        let start = (local > 1).then(|| (model.clone(), data.train.clone()));
        let t = Trainer::new(model, lora.clone(), data.train, cfg.clone(), device.clone());
        helper_start = start;
        t
    };
    // DPO's held-out pairs get their reference now, from the same starting model (ORPO's none).
    let eval_reference = (dpo && !data.eval_pairs.is_empty())
        .then(|| if needs_reference { pair_logps(&trainer.eval_model(), &data.eval_pairs, cfg.batch_size, cfg.pad_id) } else { Vec::new() });
    let has_eval = !eval_samples.is_empty() || !data.eval_pairs.is_empty();
    // A Hub id names the base as PEFT would (org/name), not by the cache path it resolved to.
    let hub_name = a.model.as_deref().and_then(crate::hub::id_of).map(|id| id.repo);
    let base_name = a.base_model_name.clone().or(hub_name).unwrap_or_else(|| model_dir.display().to_string());
    let ckpt_dir = checkpoint_dir(out);
    let mut saved = SavedState { state: trainer.state.clone(), config: cfg.clone(), base_model: base_name.clone(), best_eval_loss: None, best_step: None, evals_without_improvement: 0, reference_logps: trainer.reference_logps().to_vec() };
    let mut resumed_best = None;
    let mut restored = None;
    if let (Some(dir), Some(loaded)) = (&a.resume, loaded) {
        if loaded.saved.config != trainer.cfg {
            bail!("{}: the checkpoint was made with other training settings; resume with the same ones", dir.display());
        }
        // A PiSSA run's adapter belongs on the residual base: resume it only onto that one.
        if loaded.adapter.pissa != pissa {
            bail!("{}: the checkpoint was made {} --init pissa; resume with the same settings", dir.display(), if loaded.adapter.pissa { "with" } else { "without" });
        }
        if loaded.saved.state.peers != peers {
            bail!("{}: the checkpoint was made with --data-parallel {}; resume with the same", dir.display(), loaded.saved.state.peers);
        }
        restored = Some((loaded.adapter.clone(), loaded.moments.clone(), loaded.saved.state.clone()));
        trainer.restore(&loaded.adapter, loaded.moments, loaded.saved.state.clone())?;
        saved = loaded.saved;
        resumed_best = loaded.best;
        eprintln!("resumed at step {} of {}", trainer.state.step, trainer.state.total_steps);
    }

    // Peers 1.. step in threads of their own; this thread is peer 0, which alone evaluates,
    // logs and saves (every peer holds the same adapter after each step). When it returns,
    // the process ends with them.
    if let Some((model, train)) = helper_start {
        for rank in 1..local {
            let (model, train, lora, cfg, device, restored, dp) = (model.clone(), train.clone(), lora.clone(), cfg.clone(), device.clone(), restored.clone(), peer(rank));
            std::thread::spawn(move || -> hone::Result<()> {
                let mut t = Trainer::new(model, lora, train, cfg, device);
                if let Some((adapter, moments, state)) = restored {
                    t.restore(&adapter, moments, state)?;
                }
                let mut t = t.data_parallel(dp)?;
                while !t.done() {
                    t.try_step_pending()?;
                }
                t.leave_peers()
            });
        }
    }
    if peers > 1 {
        if let Some(n) = &nodes {
            eprintln!("node {} of {}: meeting the others at {} (--peer-timeout {}s)", n.rank, n.count, n.orchestrator, timeout.as_secs());
        }
        trainer = trainer.data_parallel(peer(0))?;
        saved.state = trainer.state.clone();
        eprintln!("data parallel: {peers} peers, {} sequences each per micro-batch, {} per step", cfg.batch_size, peers * cfg.batch_size * cfg.grad_accum.max(1));
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(trainer.state.total_steps as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}").expect("template"));
    bar.set_position(trainer.state.step as u64);
    let started = std::time::Instant::now();
    let mut tokens = 0usize;
    // Throughput after the first step (which compiles kernels and warms caches), for benchmarks.
    let mut after_first: Option<(std::time::Instant, usize)> = None;
    let mut best: Option<Adapter> = resumed_best;
    let save_every = a.save_every.unwrap_or(0);
    let eval_every = run::eval_every(&settings, trainer.state.total_steps, has_eval);
    let mut metrics = match &a.log_dir {
        Some(dir) => {
            let m = crate::metrics::MetricsLog::create(dir)?;
            say(&bar, a.quiet, format!("metrics: {} and {} (tensorboard --logdir {})", m.events_path.display(), dir.join("metrics.jsonl").display(), dir.display()));
            Some(m)
        }
        None => None,
    };
    while !trainer.done() {
        let r = trainer.try_step()?;
        tokens += r.tokens;
        match &mut after_first {
            None => after_first = Some((std::time::Instant::now(), 0)),
            Some((_, t)) => *t += r.tokens,
        }
        if !r.loss.is_finite() {
            if !writes {
                bail!("the loss became {} at step {}; node 0 saves the checkpoint (try a lower --lr)", r.loss, r.step);
            }
            save_checkpoint(&ckpt_dir, &trainer, &saved, best.as_ref(), r.step)?;
            bail!("the loss became {} at step {}; checkpoint saved in {} (try a lower --lr)", r.loss, r.step, ckpt_dir.display());
        }
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
        let msg = match &r.preference {
            Some(m) => format!("loss {:.4}{}  margin {:.4}  accuracy {:.2}  lr {:.2e}  {} tok/s", r.loss, nll_part(m), m.rewards_margins, m.rewards_accuracies, r.lr, rate(tps)),
            None => format!("loss {:.4}  lr {:.2e}  {} tok/s", r.loss, r.lr, rate(tps)),
        };
        if a.quiet {
            eprintln!("step {}/{}  {msg}", r.step, r.total_steps);
        }
        if let Some(m) = &mut metrics {
            let mut values = vec![("loss", r.loss), ("lr", r.lr), ("tokens_per_s", tps), ("epoch", r.epoch as f64)];
            values.extend(r.grad_norm.map(|g| ("grad_norm", g)));
            if let Some(p) = &r.preference {
                values.extend([("rewards_margin", p.rewards_margins), ("rewards_accuracy", p.rewards_accuracies)]);
                values.extend(p.nll_loss.map(|n| ("nll_loss", n)));
            }
            m.log(r.step, "train", &values)?;
        }
        if r.trained_tokens == 0 && r.preference.is_none() {
            say(&bar, a.quiet, format!("warning: step {} had no token the loss counts (its examples' completions are masked or cut by --max-len): its loss 0 means nothing", r.step));
        }
        bar.set_message(msg);
        bar.set_position(r.step as u64);
        let last = trainer.done();
        if has_eval && (last || (eval_every > 0 && r.step % eval_every == 0)) {
            let loss = match &eval_reference {
                Some(reference) => {
                    let m = evaluate_preference(&trainer.eval_model(), &data.eval_pairs, reference, cfg.dpo.expect("a DPO run"), cfg.batch_size, cfg.pad_id);
                    say(&bar, a.quiet, format!("step {}: eval loss {:.4}{}, margin {:.4}, accuracy {:.3}", r.step, m.loss, nll_part(&m), m.rewards_margins, m.rewards_accuracies));
                    if let Some(log) = &mut metrics {
                        log.log(r.step, "eval", &[("loss", m.loss), ("rewards_margin", m.rewards_margins), ("rewards_accuracy", m.rewards_accuracies)])?;
                    }
                    m.loss
                }
                None => {
                    let e = trainer.evaluate(&eval_samples);
                    say(&bar, a.quiet, format!("step {}: eval loss {:.4}, perplexity {:.2}", r.step, e.loss, e.perplexity));
                    if let Some(log) = &mut metrics {
                        log.log(r.step, "eval", &[("loss", e.loss), ("perplexity", e.perplexity)])?;
                    }
                    e.loss
                }
            };
            if saved.best_eval_loss.is_none_or(|b| loss < b) {
                saved.best_eval_loss = Some(loss);
                saved.best_step = Some(r.step);
                saved.evals_without_improvement = 0;
                best = Some(trainer.adapter(&base_name));
            } else {
                saved.evals_without_improvement += 1;
                if a.run.patience.is_some_and(|p| saved.evals_without_improvement >= p) {
                    say(&bar, a.quiet, format!("early stop: no improvement in {} evaluations", saved.evals_without_improvement));
                    break;
                }
            }
        }
        saved.state = trainer.state.clone();
        if writes && (stop.load(Ordering::SeqCst) || (save_every > 0 && r.step % save_every == 0 && !last)) {
            save_checkpoint(&ckpt_dir, &trainer, &saved, best.as_ref(), r.step)?;
            if stop.load(Ordering::SeqCst) {
                bar.abandon();
                eprintln!("interrupted: checkpoint at step {} in {}; continue with --resume {}", r.step, ckpt_dir.display(), ckpt_dir.display());
                return Ok(());
            }
        }
    }
    bar.finish();
    let after_first_rate = after_first.filter(|(_, n)| *n > 0).map(|(t0, n)| n as f64 / t0.elapsed().as_secs_f64());
    let adapter = match (best, saved.best_step) {
        (Some(b), Some(step)) => {
            eprintln!("keeping the best adapter (step {step}, eval loss {:.4})", saved.best_eval_loss.unwrap_or(f64::NAN));
            b
        }
        _ => trainer.adapter(&base_name),
    };
    // Trained on PiSSA's residual: saved as PEFT converts it, a LoRA of the original base.
    let adapter = match &initial {
        Some(initial) if pissa => adapter.with_initial_subtracted(initial)?,
        _ => adapter,
    };
    if !writes {
        eprintln!("node {}: done after {} steps in {:.1}s (node 0 writes the adapter)", nodes.as_ref().map_or(0, |n| n.rank), trainer.state.step, started.elapsed().as_secs_f64());
        return Ok(());
    }
    if let Err(e) = write_dir_atomic(out, &adapter_files(&adapter)) {
        let kept = if ckpt_dir.exists() { format!("the checkpoint in {} is kept: continue with --resume {} once there is room", ckpt_dir.display(), ckpt_dir.display()) } else { "no checkpoint was kept (--save-every N keeps one)".to_string() };
        bail!("writing the adapter failed: {e}; {} is not written; {kept}", out.display());
    }
    let _ = std::fs::remove_dir_all(&ckpt_dir);
    if let Some(rate) = after_first_rate {
        eprintln!("throughput after the first step: {rate:.3} tokens/s");
    }
    eprintln!(
        "wrote {} ({} layers, r={}) after {} steps in {:.1}s, {} tokens/s",
        out.display(),
        adapter.layers.len(),
        lora.r,
        trainer.state.step,
        started.elapsed().as_secs_f64(),
        rate(tokens as f64 / started.elapsed().as_secs_f64())
    );
    report_device_memory::<B>(&devices, "after training");
    if let Some(peak) = crate::plan::peak_rss_bytes() {
        eprintln!("peak memory (process RSS): {} ({peak} bytes)", hone::train::plan::human(peak));
    }
    Ok(())
}

/// Puts the adapter a run starts from (`--adapter`) on the model; its rank, alpha and layers are
/// the run's (and its dropout, unless `--dropout` says otherwise).
fn start_adapter<B: HoneBackend>(dir: &Path, run: &RunSettings, model: &mut CausalLm<B>) -> anyhow::Result<LoraConfig> {
    if run.rank.is_some() || run.alpha.is_some() || run.targets.is_some() || run.rslora || run.dora {
        bail!("--adapter {}: the adapter sets the rank, alpha, layers and DoRA; drop --rank, --alpha, --targets, --rslora and --dora", dir.display());
    }
    let adapter = Adapter::read(&Dir(dir.to_path_buf())).with_context(|| format!("--adapter {}", dir.display()))?;
    adapter.attach(model.linears_mut()).with_context(|| format!("--adapter {}", dir.display()))?;
    let dropout = run.dropout.unwrap_or(adapter.dropout);
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            l.dropout = dropout;
        }
    }
    let targets = Targets::List(adapter.layers.iter().map(|l| l.module.clone()).collect());
    eprintln!("adapter: starting from {} (r={}, alpha {}, {} layers)", dir.display(), adapter.r, adapter.alpha, adapter.layers.len());
    Ok(LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout, targets, use_rslora: adapter.use_rslora, use_dora: adapter.use_dora, init: Default::default(), seed: run.seed() })
}

/// GPU backends' own accounting: what the memory pool took from the driver (it keeps it, so
/// after training this is the run's peak, the figure `hone plan` predicts for a GPU) and what
/// live tensors hold. Nothing on the CPU backend, whose memory is the process RSS above.
fn report_device_memory<B: HoneBackend>(devices: &[B::Device], when: &str) {
    for (i, d) in devices.iter().enumerate() {
        if let Some(m) = B::device_memory(d) {
            eprintln!(
                "device memory {when} (device {i}, burn's pool): {} reserved ({} bytes), {} in use",
                hone::train::plan::human(m.reserved),
                m.reserved,
                hone::train::plan::human(m.in_use)
            );
        }
    }
}

/// `--nodes`, `--node-rank` and `--orchestrator` checked and put together.
fn nodes_of(a: &TrainArgs) -> anyhow::Result<Option<hone::train::data_parallel::Nodes>> {
    let count = a.nodes.unwrap_or(1);
    if count <= 1 {
        if a.node_rank.is_some() || a.orchestrator.is_some() {
            bail!("--node-rank and --orchestrator are for runs over several nodes: add --nodes N (N > 1)");
        }
        return Ok(None);
    }
    let rank = a.node_rank.context("--nodes needs --node-rank (0 to N-1) on every node")?;
    if rank >= count {
        bail!("--node-rank {rank}: expected 0 to {}", count - 1);
    }
    let orchestrator = a.orchestrator.clone().context("--nodes needs --orchestrator HOST:PORT (the same on every node; node 0 listens there)")?;
    let nodes = hone::train::data_parallel::Nodes { count, rank, orchestrator };
    nodes.port()?;
    Ok(Some(nodes))
}

/// Where a run writing `out` keeps its checkpoints: `OUT.checkpoint` beside it.
fn checkpoint_dir(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}.checkpoint", out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()))
}

/// Saves a checkpoint; a failure (a full disk, say) names the cause and what is still there.
fn save_checkpoint<B: burn::tensor::backend::AutodiffBackend + HoneBackend>(dir: &Path, trainer: &Trainer<B>, saved: &SavedState, best: Option<&Adapter>, step: usize) -> anyhow::Result<()>
where
    B::InnerBackend: HoneBackend,
{
    checkpoint::save(dir, trainer, saved, best).map_err(|e| {
        let previous = checkpoint::newest_whole_step(dir).map(|s| format!("the previous checkpoint (step {s}) in {} is intact: free space and continue with --resume {}", dir.display(), dir.display()));
        anyhow::anyhow!("saving the checkpoint at step {step} failed: {e}; {}", previous.unwrap_or_else(|| "there is no earlier checkpoint".to_string()))
    })
}

/// A line above the progress bar, or on stderr when the bar is hidden.
fn say(bar: &ProgressBar, quiet: bool, msg: String) {
    if quiet {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A Hugging Face model directory, a GGUF file or a Hub id [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory to apply [default: none, the base alone].
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The data to evaluate on: JSONL, CSV or Parquet, or a Hub dataset id.
    #[arg(long)]
    data: PathBuf,
    /// With a Hub dataset id as --data: the split [default: test, else validation].
    #[arg(long)]
    split: Option<String>,
    /// Dataset format: text | completion | chat | alpaca [default: detected per line].
    #[arg(long)]
    format: Option<String>,
    /// Tokens per sample; longer samples are truncated [default: no limit].
    #[arg(long)]
    max_len: Option<usize>,
    /// Count the loss on every token, not only on completions / assistant turns.
    #[arg(long)]
    train_on_prompts: bool,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Quantize the base to NF4 while loading (as it was trained with QLoRA).
    #[arg(long)]
    nf4: bool,
    /// Where to compute: cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// One JSON line: {"loss": …, "perplexity": …, "tokens": …} (with --method dpo or orpo,
    /// TRL's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
    /// logps/chosen, logps/rejected; ORPO's also nll_loss, log_odds_ratio, log_odds_chosen).
    #[arg(long)]
    json: bool,
    /// sft (loss and perplexity), dpo (on preference pairs, the base without the adapter as
    /// the reference) or orpo (on preference pairs, no reference) [default: sft].
    #[arg(long)]
    method: Option<String>,
    /// With --method dpo: DPO's β; with orpo: ORPO's λ (TRL's beta) [default: 0.1].
    #[arg(long)]
    beta: Option<f64>,
    /// With --method dpo: sigmoid, ipo or hinge [default: sigmoid].
    #[arg(long)]
    loss_type: Option<String>,
    /// Rename the data's columns: `prompt=question,completion=answer` [default: as they are].
    #[arg(long)]
    columns: Option<String>,
}

impl EvalArgs {
    fn data(&self) -> DataArg<'_> {
        let splits = match &self.split {
            Some(s) => vec![s.clone()],
            None => vec!["test".into(), "validation".into()],
        };
        DataArg { arg: &self.data, splits }
    }
}

pub fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let path = crate::model::resolve(a.model.as_deref())?;
    let text = crate::model::text(&path)?;
    let (tok, template) = (text.tokenizer, text.template);
    let settings = RunSettings { method: a.method.clone(), beta: a.beta, loss_type: a.loss_type.clone(), ..Default::default() };
    let columns = Columns::parse(a.columns.as_deref().unwrap_or("")).map_err(|e| anyhow::anyhow!("--columns: {e}"))?;
    if let Some(dpo) = settings.dpo()? {
        let pairs = load_pairs(&a.data(), &columns, false, &tok, template.as_ref(), a.max_len, dpo.loss_type)?.pairs;
        let metrics = with_backend!(a.backend, |B, device| {
            let mut model = crate::model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
            if let Some(dir) = &a.adapter {
                Adapter::read(&Dir(dir.clone()))?.attach(model.linears_mut())?;
            }
            let reference = match dpo.loss_type.needs_reference() {
                true => hone::lora::linear::without_adapters(|| pair_logps(&model, &pairs, a.batch_size, pad_id(&tok))),
                false => Vec::new(),
            };
            evaluate_preference(&model, &pairs, &reference, dpo, a.batch_size, pad_id(&tok))
        });
        if a.json {
            println!("{}", serde_json::to_string(&metrics)?);
        } else {
            println!(
                "loss {:.6}{}  rewards/margins {:.6}  rewards/accuracies {:.4}  rewards/chosen {:.6}  rewards/rejected {:.6}  logps/chosen {:.4}  logps/rejected {:.4}  ({} pairs)",
                metrics.loss, nll_part(&metrics), metrics.rewards_margins, metrics.rewards_accuracies, metrics.rewards_chosen, metrics.rewards_rejected, metrics.logps_chosen, metrics.logps_rejected, pairs.len()
            );
        }
        return Ok(());
    }
    let format = match &a.format {
        Some(f) => Some(Format::parse(f).with_context(|| format!("--format {f}"))?),
        None => None,
    };
    let opts = EncodeOptions { train_on_completions_only: !a.train_on_prompts, max_len: a.max_len };
    let (samples, _, _) = load_samples(&a.data(), &columns, format, false, &tok, template.as_ref(), opts)?;
    let report = with_backend!(a.backend, |B, device| {
        let mut model = crate::model::weights::<B>(&path, LoadOptions { nf4: a.nf4.then(Nf4Options::default) }, &device)?;
        if let Some(dir) = &a.adapter {
            Adapter::read(&Dir(dir.clone()))?.attach(model.linears_mut())?;
        }
        evaluate(&model, &samples, a.batch_size, 0, &device)
    });
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("loss {:.6}  perplexity {:.4}  ({} tokens)", report.loss, report.perplexity, report.tokens);
    }
    Ok(())
}

/// ORPO's NLL part of the loss, for progress lines ("" for DPO).
fn nll_part(m: &DpoMetrics) -> String {
    m.nll_loss.map(|n| format!(" (nll {n:.4})")).unwrap_or_default()
}

/// Tokens per second with the digits that matter: a big model on a CPU trains at under one.
fn rate(tps: f64) -> String {
    if tps >= 100.0 {
        format!("{tps:.0}")
    } else if tps >= 1.0 {
        format!("{tps:.1}")
    } else {
        format!("{tps:.3}")
    }
}
