//! What a training run is made from, shared by `hone train` and the page so that both train the
//! same way from the same inputs: the settings (the CLI's long flag names, `_` for `-`, and its
//! defaults), samples from JSONL text, and the held-out split.

use super::optim::{AdamWConfig, Optim};
use super::loss::counted_tokens;
use super::preference::{DpoConfig, LossType};
use super::schedule::Schedule;
use super::trainer::TrainConfig;
use crate::data::dataset::{encode, parse_jsonl, EncodeOptions};
use crate::data::preference::{drop_fully_truncated, encode_orpo_pair, encode_pair, parse_preference_jsonl, truncate_orpo_pairs, Sequence};
use crate::data::{ChatTemplate, Format, Sample, Tokenizer};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, Targets};
use crate::model::Nf4Options;

/// Row length when packing without `max_len`.
pub const DEFAULT_PACK_LEN: usize = 2048;

/// Every setting of a run that changes what is trained. `None` means the default. With the
/// `cli` feature these are also `hone train`'s flags (the same names, `-` for `_`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// Dataset format: text | completion | chat | alpaca [default: detected per line].
    #[cfg_attr(feature = "cli", arg(long))]
    pub format: Option<String>,
    /// Rename the dataset's columns to the names hone reads: `prompt=question,completion=answer`
    /// (JSONL, CSV and Parquet alike) [default: as they are].
    #[cfg_attr(feature = "cli", arg(long))]
    pub columns: Option<String>,
    /// Put loss on every token, not only on completions / assistant turns.
    #[cfg_attr(feature = "cli", arg(long))]
    pub train_on_prompts: bool,
    /// LoRA rank r [default: 16].
    #[cfg_attr(feature = "cli", arg(long))]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (alpha / √r with --rslora) [default: 32].
    #[cfg_attr(feature = "cli", arg(long))]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA branch's input [default: 0.05].
    #[cfg_attr(feature = "cli", arg(long))]
    pub dropout: Option<f64>,
    /// Adapted linears: all-linear, a comma-separated list (q_proj,v_proj,…), or a regex [default: all-linear].
    #[cfg_attr(feature = "cli", arg(long))]
    pub targets: Option<String>,
    /// Rank-stabilised LoRA: scale by alpha / √r instead of alpha / r.
    #[cfg_attr(feature = "cli", arg(long))]
    pub rslora: bool,
    /// DoRA (PEFT's use_dora): also train a magnitude per output row of each adapted linear.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dora: bool,
    /// How new adapters start: default (PEFT's: A random, B zero) | pissa (PEFT's PiSSA: A and B
    /// from the SVD of each weight, the base becomes W − s·B·A while loading; the adapter is saved
    /// converted to a rank-2r LoRA of the original base) | loftq (LoftQ for QLoRA, PEFT's
    /// replace_lora_weights_loftq: A and B from the SVD of the NF4 quantization error, the base
    /// stays NF4(W)) [default: default].
    #[cfg_attr(feature = "cli", arg(long))]
    pub init: Option<String>,
    /// Peak learning rate of AdamW [default: 0.0002].
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr: Option<f64>,
    /// Learning-rate schedule after warm-up: constant | linear | cosine [default: linear].
    #[cfg_attr(feature = "cli", arg(long))]
    pub schedule: Option<String>,
    /// Steps of linear warm-up from 0 to --lr [default: 0].
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup_steps: Option<usize>,
    /// AdamW's decoupled weight decay [default: 0].
    #[cfg_attr(feature = "cli", arg(long))]
    pub weight_decay: Option<f64>,
    /// AdamW's epsilon, added to √v̂ in each update (transformers' adam_epsilon) [default: 1e-8].
    #[cfg_attr(feature = "cli", arg(long))]
    pub adam_epsilon: Option<f64>,
    /// Optimizer: adamw (f32 moments, torch's AdamW) or adamw_8bit (bitsandbytes' 8-bit AdamW:
    /// 2 bytes of state per LoRA value instead of 8; transformers' names adamw_torch,
    /// adamw_bnb_8bit and paged_adamw_8bit are accepted) [default: adamw].
    #[cfg_attr(feature = "cli", arg(long))]
    pub optim: Option<String>,
    /// With adamw_8bit, tensors with fewer values keep f32 moments (bitsandbytes' min_8bit_size) [default: 4096].
    #[cfg_attr(feature = "cli", arg(long))]
    pub min_8bit_size: Option<usize>,
    /// Global gradient-norm clipping; 0 disables [default: 1].
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_grad_norm: Option<f64>,
    /// Passes over the training data [default: 1].
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "steps"))]
    pub epochs: Option<usize>,
    /// Optimizer steps to run, instead of --epochs [default: as many as --epochs gives].
    #[cfg_attr(feature = "cli", arg(long))]
    pub steps: Option<usize>,
    /// Sequences per micro-batch [default: 4].
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch_size: Option<usize>,
    /// Micro-batches whose gradients add up to one optimizer step [default: 1].
    #[cfg_attr(feature = "cli", arg(long))]
    pub grad_accum: Option<usize>,
    /// Tokens per sample; longer samples are truncated and counted [default: no limit; 2048 with --packing].
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_len: Option<usize>,
    /// Seed of the LoRA initialisation, shuffling and dropout [default: 42].
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: Option<u64>,
    /// Base weights: nf4 (QLoRA) or none (plain LoRA on f32 weights) [default: nf4].
    #[cfg_attr(feature = "cli", arg(long))]
    pub quantize: Option<String>,
    /// Fraction of the training data held out for evaluation [default: none held out].
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps and at the end [default: five times over the run, with eval data].
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement; the best adapter is kept [default: never stop early].
    #[cfg_attr(feature = "cli", arg(long))]
    pub patience: Option<usize>,
    /// Activation checkpointing per decoder layer: on or off [default: on].
    #[cfg_attr(feature = "cli", arg(long))]
    pub checkpointing: Option<String>,
    /// Pack several samples into each row of --max-len tokens (no attention across them).
    #[cfg_attr(feature = "cli", arg(long))]
    pub packing: bool,
    /// Fill each micro-batch up to this many (padded) tokens instead of --batch-size rows [default: off].
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_batch_tokens: Option<usize>,
    /// What to train: sft (supervised, on text / completions / chats), dpo (preference pairs:
    /// prompt, chosen, rejected; TRL's DPOTrainer) or orpo (the same pairs, no reference; TRL's
    /// ORPO trainer) [default: sft].
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: Option<String>,
    /// DPO's β: how far the policy may move from the reference; ORPO's λ (TRL's beta), the
    /// odds-ratio term's weight [default: 0.1].
    #[cfg_attr(feature = "cli", arg(long))]
    pub beta: Option<f64>,
    /// DPO's loss: sigmoid (DPO), ipo or hinge, as TRL computes them [default: sigmoid].
    #[cfg_attr(feature = "cli", arg(long))]
    pub loss_type: Option<String>,
}

macro_rules! overlay {
    ($base:ident, $top:ident; $($opt:ident),*; $($flag:ident),*) => {
        $( if $top.$opt.is_some() { $base.$opt = $top.$opt.clone(); } )*
        $( $base.$flag |= $top.$flag; )*
    };
}

impl RunSettings {
    /// These settings with every one that `top` sets put over them (flags over a config file).
    pub fn overlay(&mut self, top: &RunSettings) {
        let base = self;
        overlay!(base, top; format, columns, init, rank, alpha, dropout, targets, lr, schedule, warmup_steps, weight_decay, adam_epsilon, optim, min_8bit_size, max_grad_norm, epochs, steps,
            batch_size, grad_accum, max_len, seed, quantize, eval_split, eval_every, patience, checkpointing, max_batch_tokens, method, beta, loss_type;
            train_on_prompts, rslora, dora, packing);
        if top.epochs.is_some() && top.steps.is_none() {
            base.steps = None;
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(42)
    }

    pub fn format(&self) -> Result<Option<Format>> {
        match &self.format {
            None => Ok(None),
            Some(f) => Format::parse(f).map(Some).ok_or_else(|| Error::format("format", format!("{f}: expected text, completion, chat or alpaca"))),
        }
    }

    pub fn encode_options(&self) -> EncodeOptions {
        EncodeOptions { train_on_completions_only: !self.train_on_prompts, max_len: self.max_len }
    }

    /// NF4 base weights (QLoRA, the default) or none.
    pub fn nf4(&self) -> Result<Option<Nf4Options>> {
        match self.quantize.as_deref().unwrap_or("nf4") {
            "nf4" => Ok(Some(Nf4Options::default())),
            "none" => Ok(None),
            other => Err(Error::format("quantize", format!("{other}: expected nf4 or none"))),
        }
    }

    pub fn columns(&self) -> Result<crate::data::table::Columns> {
        crate::data::table::Columns::parse(self.columns.as_deref().unwrap_or("")).map_err(|e| Error::format("columns", e))
    }

    pub fn init(&self) -> Result<crate::lora::init::Init> {
        let s = self.init.as_deref().unwrap_or("default");
        crate::lora::init::Init::parse(s).ok_or_else(|| Error::format("init", format!("{s}: expected default, pissa or loftq")))
    }

    pub fn optim(&self) -> Result<Optim> {
        Optim::parse(self.optim.as_deref().unwrap_or("adamw")).map_err(|e| Error::format("optim", e))
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.rank.unwrap_or(16),
            alpha: self.alpha.unwrap_or(32.0),
            dropout: self.dropout.unwrap_or(0.05),
            targets: Targets::parse(self.targets.as_deref().unwrap_or("all-linear")),
            use_rslora: self.rslora,
            use_dora: self.dora,
            init: self.init().unwrap_or_default(),
            seed: self.seed(),
        }
    }

    pub fn train(&self, pad_id: u32) -> Result<TrainConfig> {
        Ok(TrainConfig {
            lr: self.lr.unwrap_or(2e-4),
            schedule: match self.schedule.as_deref() {
                None => Schedule::Linear,
                Some(s) => Schedule::parse(s).ok_or_else(|| Error::format("schedule", format!("{s}: expected constant, linear or cosine")))?,
            },
            warmup_steps: self.warmup_steps.unwrap_or(0),
            adamw: AdamWConfig { weight_decay: self.weight_decay.unwrap_or(0.0), eps: self.adam_epsilon.unwrap_or(AdamWConfig::default().eps), ..Default::default() },
            optim: self.optim()?,
            min_8bit_size: self.min_8bit_size.unwrap_or(super::adamw8bit::MIN_8BIT_SIZE),
            max_grad_norm: self.max_grad_norm.unwrap_or(1.0).gt(&0.0).then(|| self.max_grad_norm.unwrap_or(1.0)),
            batch_size: self.batch_size.unwrap_or(4).max(1),
            grad_accum: self.grad_accum.unwrap_or(1).max(1),
            max_steps: self.steps,
            epochs: self.epochs.unwrap_or(1),
            seed: self.seed(),
            shuffle: true,
            pad_id,
            checkpointing: match self.checkpointing.as_deref().unwrap_or("on") {
                "on" | "true" => true,
                "off" | "false" => false,
                other => return Err(Error::format("checkpointing", format!("{other}: expected on or off"))),
            },
            pack_len: self.packing.then(|| self.max_len.unwrap_or(DEFAULT_PACK_LEN)),
            max_batch_tokens: self.max_batch_tokens,
            logits_chunk: super::trainer::LOGITS_CHUNK,
            dpo: self.dpo()?,
        })
    }

    /// The preference settings with `--method dpo` or `orpo` (ORPO is its own loss type), `None`
    /// for SFT.
    pub fn dpo(&self) -> Result<Option<DpoConfig>> {
        let dpo = match self.method.as_deref().unwrap_or("sft") {
            "sft" => None,
            "dpo" => {
                let loss_type = match self.loss_type.as_deref() {
                    None => LossType::Sigmoid,
                    Some(l) => LossType::parse(l).ok_or_else(|| Error::format("loss_type", format!("{l}: expected sigmoid, ipo or hinge")))?,
                };
                Some(DpoConfig { loss_type, beta: self.beta.unwrap_or(0.1) })
            }
            "orpo" if self.loss_type.is_some() => return Err(Error::format("loss_type", "ORPO has one loss: drop --loss-type (it chooses DPO's)")),
            "orpo" => Some(DpoConfig { loss_type: LossType::Orpo, beta: self.beta.unwrap_or(0.1) }),
            other => return Err(Error::format("method", format!("{other}: expected sft, dpo or orpo"))),
        };
        if dpo.is_none() && (self.beta.is_some() || self.loss_type.is_some()) {
            return Err(Error::format("method", "beta and loss_type are preference settings: add --method dpo (or orpo, for beta)"));
        }
        if dpo.is_some() && (self.packing || self.max_batch_tokens.is_some()) {
            return Err(Error::format("method", "preference runs batch whole pairs: drop --packing and --max-batch-tokens"));
        }
        if let Some(b) = self.beta.filter(|b| b.is_nan() || *b <= 0.0) {
            return Err(Error::format("beta", format!("{b}: must be positive")));
        }
        Ok(dpo)
    }
}

/// The id padding uses: the tokenizer's end-of-text or pad token, else 0 (its labels are
/// ignored either way).
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.token_to_id("<|endoftext|>").or_else(|| tok.token_to_id("<pad>")).unwrap_or(0)
}

/// Samples from JSONL text, and how many were truncated to `max_len` and how many bad lines
/// were skipped. `file` names the text in errors.
pub struct Samples {
    pub samples: Vec<Sample>,
    pub truncated: usize,
    pub skipped: usize,
    /// Samples with no token the loss counts (every label masked, or only the first), and how
    /// many of them had one before `max_len` cut it away.
    pub without_targets: usize,
    pub lost_to_max_len: usize,
}

/// Tokens the loss counts in `samples` (labels after the shift).
pub fn counted_in(samples: &[Sample]) -> usize {
    samples.iter().map(|s| counted_tokens(std::slice::from_ref(&s.labels))).sum()
}

impl Samples {
    /// Refuses data with no token to learn from or score (a loss of 0 and a perplexity of 1
    /// would say nothing), naming the cause. `file` names the data, `max_len` the limit used.
    pub fn require_targets(&self, file: &str, max_len: Option<usize>) -> Result<()> {
        if self.without_targets < self.samples.len() {
            return Ok(());
        }
        let n = self.samples.len();
        Err(Error::format(
            file,
            match max_len {
                Some(max) if self.lost_to_max_len > 0 => format!(
                    "no example has a token the loss counts: {} of {n} lost their completion to max_len {max} (the prompt fills it); raise max_len",
                    self.lost_to_max_len
                ),
                _ => format!("no example has a token the loss counts: every label of the {n} examples is masked (the loss is on completions / assistant turns only); train on prompts too, or add completions"),
            },
        ))
    }

    /// A line for the user when some (not all) samples have no token to train on, else `None`.
    pub fn warning(&self, file: &str) -> Option<String> {
        (self.without_targets > 0).then(|| {
            format!(
                "{file}: {} of {} examples have no token the loss counts ({} lost their completion to max_len); they add nothing to the loss",
                self.without_targets,
                self.samples.len(),
                self.lost_to_max_len
            )
        })
    }
}

/// Refuses held-out samples that have no token to score, naming them.
pub fn require_eval_targets(samples: &[Sample], what: &str) -> Result<()> {
    if !samples.is_empty() && counted_in(samples) == 0 {
        return Err(Error::format(what, format!("none of the {} held-out examples has a token to score (every completion masked or cut by max_len): loss and perplexity would be meaningless", samples.len())));
    }
    Ok(())
}

pub fn samples_from_jsonl(
    text: &str,
    file: &str,
    format: Option<Format>,
    skip_bad_lines: bool,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: EncodeOptions,
) -> Result<Samples> {
    let (examples, skipped) = parse_jsonl(text, file, format, skip_bad_lines)?;
    let eos = template.and_then(|t| t.eos_token.clone());
    let mut samples = Vec::with_capacity(examples.len());
    let (mut truncated, mut without_targets, mut lost_to_max_len) = (0, 0, 0);
    let counted = |s: &Sample| counted_tokens(std::slice::from_ref(&s.labels));
    for (i, e) in examples.iter().enumerate() {
        let mut s = encode(e, tok, template, eos.as_deref(), EncodeOptions { max_len: None, ..opts })
            .map_err(|err| Error::format(format!("{file}: example {}", i + 1), err))?;
        let had_targets = counted(&s) > 0;
        if let Some(max) = opts.max_len {
            if s.input_ids.len() > max {
                truncated += 1;
                s.input_ids.truncate(max);
                s.labels.truncate(max);
            }
        }
        if counted(&s) == 0 {
            without_targets += 1;
            lost_to_max_len += usize::from(had_targets);
        }
        samples.push(s);
    }
    Ok(Samples { samples, truncated, skipped, without_targets, lost_to_max_len })
}

/// Preference pairs from JSONL text, each as its (chosen, rejected) sequences cut to `max_len`;
/// how many pairs were dropped because their prompt alone reaches `max_len` (as TRL), and how
/// many bad lines were skipped.
pub struct Pairs {
    pub pairs: Vec<[Sequence; 2]>,
    pub dropped: usize,
    pub skipped: usize,
}

/// Tokenized as `loss_type` wants them: ORPO's trainer tokenizes differently from DPO's.
pub fn pairs_from_jsonl(text: &str, file: &str, skip_bad_lines: bool, tok: &Tokenizer, template: Option<&ChatTemplate>, max_len: Option<usize>, loss_type: LossType) -> Result<Pairs> {
    let (examples, skipped) = parse_preference_jsonl(text, file, skip_bad_lines)?;
    let eos = template.and_then(|t| t.eos_token.clone());
    let (pairs, dropped) = if loss_type == LossType::Orpo {
        let id = |t: Option<&String>| t.and_then(|t| tok.token_to_id(t));
        let (bos, eos) = (id(template.and_then(|t| t.bos_token.as_ref())), id(eos.as_ref()));
        let mut pairs = Vec::with_capacity(examples.len());
        for (at, e) in &examples {
            pairs.push(encode_orpo_pair(e, tok, template, bos, eos, at)?);
        }
        let dropped = truncate_orpo_pairs(&mut pairs, max_len);
        (pairs, dropped)
    } else {
        let mut encoded = Vec::with_capacity(examples.len());
        for (at, e) in &examples {
            encoded.push(encode_pair(e, tok, template, eos.as_deref(), at)?);
        }
        let dropped = drop_fully_truncated(&mut encoded, max_len);
        (encoded.iter().map(|p| p.sequences(max_len)).collect(), dropped)
    };
    if pairs.is_empty() {
        return Err(Error::format(file, format!("no pair keeps a completion token within max_len ({dropped} dropped)")));
    }
    Ok(Pairs { pairs, dropped, skipped })
}

/// Holds out `fraction` of the samples: every k-th one, so the split is stable and spread over
/// the file. Returns (train, eval).
pub fn split_eval<T>(mut train: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n_eval = ((train.len() as f64) * fraction).round().clamp(1.0, (train.len().saturating_sub(1)) as f64) as usize;
    let stride = (train.len() / n_eval.max(1)).max(1);
    let offset = (seed as usize) % stride;
    let mut eval = Vec::new();
    let mut i = train.len();
    while i > 0 {
        i -= 1;
        if i % stride == offset && eval.len() < n_eval {
            eval.push(train.remove(i));
        }
    }
    eval.reverse();
    (train, eval)
}

/// Evaluate every `eval_every` steps, by default five times over the run.
pub fn eval_every(settings: &RunSettings, total_steps: usize, has_eval: bool) -> usize {
    settings.eval_every.unwrap_or(if has_eval { (total_steps / 5).max(1) } else { 0 })
}
