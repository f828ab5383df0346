//! A fine-tuning session in the page's worker: the model the user picked, its data, the
//! trainer, and everything the page shows or saves. The same core pieces as `hone train`
//! (settings, samples, trainer, PEFT files), so both write the same adapter from the same inputs.

use crate::blob::{BlobFiles, BlobSource};
use crate::{device, js_err, Backend};
use burn::backend::wgpu::WgpuDevice;
use burn::backend::Autodiff;
use hone::data::{Message, Sample};
use hone::compare::{general_samples, Comparison, HeldOut, Measured, GENERAL};
use hone::generate::{generate_async, generate_batch_async, GenerateConfig};
use hone::score::Check;
use hone::io::gguf::Gguf;
use hone::io::{FileSet, MemFiles};
use hone::lora::init::Init;
use hone::lora::peft::{add_adapters, Adapter};
use hone::model::{CausalLm, Config, LoadOptions, ModelText};
use hone::ops::HoneBackend;
use hone::readback::read_f32;
use hone::train::checkpoint::{self, adapter_files, checkpoint_files, SavedState};
use hone::train::plan;
use hone::data::preference::Sequence;
use hone::train::preference::{pair_sums_async, preference_loss, DpoConfig, DpoMetrics, PairLogps};
use hone::train::run::{self, pad_id, pairs_from_jsonl, samples_from_jsonl, RunSettings};
use hone::train::trainer::{eval_report, evaluate_pending};
use hone::train::Trainer;
use serde::Serialize;
use wasm_bindgen::prelude::*;

type Train = Autodiff<Backend>;

enum Weights {
    Dir(BlobFiles),
    Gguf(Gguf),
}

/// What the page shows about a model once it is opened.
#[derive(Serialize)]
struct ModelInfo {
    name: String,
    model_type: String,
    layers: usize,
    hidden_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    has_chat_template: bool,
    max_buffer_size: u64,
}

#[derive(Serialize)]
struct Prepared {
    train_examples: usize,
    eval_examples: usize,
    truncated: usize,
    skipped: usize,
    total_steps: usize,
    eval_every: usize,
    adapted_layers: usize,
}

#[derive(Serialize)]
struct PreviewToken {
    text: String,
    trained: bool,
    /// Preference pairs: "prompt", "chosen" or "rejected" (absent for SFT).
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<&'static str>,
}

fn to_js<T: Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(js_err)
}

fn files_to_map(files: Vec<(&str, Vec<u8>)>) -> js_sys::Map {
    let map = js_sys::Map::new();
    for (name, bytes) in files {
        map.set(&JsValue::from_str(name), &js_sys::Uint8Array::from(bytes.as_slice()));
    }
    map
}

#[wasm_bindgen]
pub struct Session {
    name: String,
    weights: Weights,
    config: Config,
    text: ModelText,
    device: WgpuDevice,
    max_buffer_size: u64,
    settings: RunSettings,
    /// The model for generation before any training, and whether its base is NF4.
    model: Option<(bool, CausalLm<Backend>)>,
    trainer: Option<Trainer<Train>>,
    eval: Vec<Sample>,
    /// Preference runs: the held-out pairs and their reference log-probabilities.
    eval_pairs: Vec<[Sequence; 2]>,
    eval_reference: Vec<PairLogps>,
    saved: Option<SavedState>,
    /// The adapter a PiSSA or LoftQ run started from (PiSSA's is subtracted when saving).
    initial: Option<Adapter>,
}

#[wasm_bindgen]
impl Session {
    /// Opens a model from the files the user picked: a Hugging Face folder (config.json,
    /// tokenizer.json, safetensors) or one .gguf file. Only config and tokenizer are read now;
    /// weights are read tensor by tensor when training starts.
    pub async fn open(name: String, names: Vec<String>, blobs: Vec<web_sys::Blob>) -> Result<Session, JsError> {
        if names.len() != blobs.len() {
            return Err(JsError::new("names and files differ in number"));
        }
        let base = |n: &str| n.rsplit('/').next().unwrap_or(n).to_string();
        let gguf: Vec<usize> = (0..names.len()).filter(|&i| names[i].to_ascii_lowercase().ends_with(".gguf")).collect();
        let (weights, config, text) = if let Some(&i) = gguf.first() {
            let g = Gguf::open(Box::new(BlobSource::new(base(&names[i]), blobs[i].clone()))).map_err(js_err)?;
            let config = hone::model::gguf::config_from_gguf(&g).map_err(js_err)?;
            let text = ModelText::from_gguf(&g).map_err(js_err)?;
            (Weights::Gguf(g), config, text)
        } else {
            let mut files = BlobFiles::new(&name);
            for (n, b) in names.iter().zip(&blobs) {
                files.insert(base(n), b.clone());
            }
            if files.open("config.json").map_err(js_err)?.is_none() {
                return Err(JsError::new(&format!(
                    "{name}: not a model folder: it has no config.json (and no .gguf file). Pick a Hugging Face model folder with config.json, tokenizer.json and .safetensors weights, or a .gguf file."
                )));
            }
            let config = hone::model::load::read_config(&files).map_err(js_err)?;
            let text = ModelText::from_files(&files).map_err(js_err)?;
            (Weights::Dir(files), config, text)
        };
        let (device, limits) = device_with_limits().await;
        Ok(Session {
            name,
            weights,
            config,
            text,
            device,
            max_buffer_size: limits,
            settings: RunSettings::default(),
            model: None,
            trainer: None,
            eval: Vec::new(),
            eval_pairs: Vec::new(),
            eval_reference: Vec::new(),
            saved: None,
            initial: None,
        })
    }

    pub fn info(&self) -> Result<JsValue, JsError> {
        let c = &self.config;
        to_js(&ModelInfo {
            name: self.name.clone(),
            model_type: c.model_type.clone(),
            layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
            has_chat_template: self.text.template.is_some(),
            max_buffer_size: self.max_buffer_size,
        })
    }

    /// The memory a run with these settings needs (an estimate from config.json), and whether it
    /// fits this GPU's largest buffer.
    pub fn estimate(&self, settings: JsValue) -> Result<JsValue, JsError> {
        let s = parse_settings(settings)?;
        let p = self.plan(&s)?;
        #[derive(Serialize)]
        struct Estimate {
            #[serde(flatten)]
            plan: plan::MemoryPlan,
            total: String,
            fits: bool,
            max_buffer_size: u64,
        }
        to_js(&Estimate { total: plan::human(p.total_bytes), fits: p.largest_buffer_bytes <= self.max_buffer_size, max_buffer_size: self.max_buffer_size, plan: p })
    }

    /// The first `n` examples as the trainer sees them: each token's text and whether it is
    /// trained on (has a label).
    pub fn preview(&self, data: String, settings: JsValue, n: usize) -> Result<JsValue, JsError> {
        let s = parse_settings(settings)?;
        let data = renamed(data, "dataset", &s)?;
        let head: String = data.lines().filter(|l| !l.trim().is_empty()).take(n).collect::<Vec<_>>().join("\n");
        if let Some(dpo) = s.dpo().map_err(js_err)? {
            // Each pair as its chosen and its rejected sequence, the completions marked.
            let pairs = pairs_from_jsonl(&head, "dataset", false, &self.text.tokenizer, self.text.template.as_ref(), s.max_len, dpo.loss_type).map_err(js_err)?;
            let mut out = Vec::new();
            for (sequence, side) in pairs.pairs.iter().flat_map(|p| [(&p[0], "chosen"), (&p[1], "rejected")]) {
                let mut toks = Vec::new();
                for (&id, &completion) in sequence.ids.iter().zip(&sequence.completion) {
                    let text = self.text.tokenizer.decode(&[id], false).map_err(js_err)?;
                    toks.push(PreviewToken { text, trained: completion, part: Some(if completion { side } else { "prompt" }) });
                }
                out.push(toks);
            }
            return to_js(&out);
        }
        let samples = samples_from_jsonl(&head, "dataset", s.format().map_err(js_err)?, false, &self.text.tokenizer, self.text.template.as_ref(), s.encode_options())
            .map_err(js_err)?;
        let mut out = Vec::new();
        for sample in &samples.samples {
            let mut toks = Vec::new();
            for (i, &id) in sample.input_ids.iter().enumerate() {
                let text = self.text.tokenizer.decode(&[id], false).map_err(js_err)?;
                toks.push(PreviewToken { text, trained: sample.labels.get(i).is_some_and(|&l| l >= 0), part: None });
            }
            out.push(toks);
        }
        to_js(&out)
    }

    /// Reads the weights (NF4 while loading unless `quantize` is "none"), adds fresh LoRA
    /// adapters, and sets up the trainer on `data` (JSONL) with `eval_data` or a split held out.
    pub async fn prepare(&mut self, data: String, eval_data: Option<String>, settings: JsValue) -> Result<JsValue, JsError> {
        let s = parse_settings(settings)?;
        let data = renamed(data, "dataset", &s)?;
        let eval_data = eval_data.map(|e| renamed(e, "eval dataset", &s)).transpose()?;
        let est = self.plan(&s)?;
        if est.largest_buffer_bytes > self.max_buffer_size {
            return Err(JsError::new(&format!(
                "{}: the model does not fit this GPU: {} needs a {} buffer, and this GPU's largest is {}",
                self.name,
                est.largest_buffer,
                plan::human(est.largest_buffer_bytes),
                plan::human(self.max_buffer_size)
            )));
        }
        if let Some(dpo) = s.dpo().map_err(js_err)? {
            return self.prepare_preference(data, eval_data, s, dpo).await;
        }
        let (format, opts) = (s.format().map_err(js_err)?, s.encode_options());
        let (tok, template) = (&self.text.tokenizer, self.text.template.as_ref());
        let train = samples_from_jsonl(&data, "dataset", format, false, tok, template, opts).map_err(js_err)?;
        train.require_targets("dataset", opts.max_len).map_err(js_err)?;
        let (train_samples, eval_samples) = match (eval_data, s.eval_split) {
            (Some(e), _) if !e.trim().is_empty() => {
                let eval = samples_from_jsonl(&e, "eval dataset", format, false, tok, template, opts).map_err(js_err)?;
                eval.require_targets("eval dataset", opts.max_len).map_err(js_err)?;
                (train.samples, eval.samples)
            }
            (_, Some(f)) if f > 0.0 && f < 1.0 && train.samples.len() > 1 => run::split_eval(train.samples, f, s.seed()),
            _ => (train.samples, Vec::new()),
        };
        run::require_eval_targets(&eval_samples, "held-out examples").map_err(js_err)?;
        let cfg = s.train(pad_id(tok)).map_err(js_err)?;
        let (model, lora, adapted) = self.adapted_model(&s)?;
        let trainer = Trainer::new(model, lora, train_samples, cfg, self.device.clone());
        let counts = (eval_samples.len(), train.truncated, train.skipped, adapted);
        self.eval = eval_samples;
        self.eval_pairs = Vec::new();
        self.eval_reference = Vec::new();
        self.start(trainer, s, counts)
    }

    /// One optimizer step; resolves to {step, total_steps, epoch, loss, lr, tokens, trained_tokens, grad_norm}.
    pub async fn step(&mut self) -> Result<JsValue, JsError> {
        let trainer = self.trainer.as_mut().ok_or_else(|| JsError::new("prepare first"))?;
        if trainer.done() {
            return Err(JsError::new("training is finished"));
        }
        let pending = trainer.step_pending_async().await.map_err(js_err)?;
        let mut r = pending.report;
        // One read for both (each read is a round trip to the GPU process).
        let both = match pending.grad_norm {
            Some(g) => burn::tensor::Tensor::cat(vec![pending.loss_sum.reshape([1]), g.reshape([1])], 0),
            None => pending.loss_sum.reshape([1]),
        };
        let read = read_f32(both).await.map_err(js_err)?;
        r.loss = read[0] as f64;
        r.grad_norm = read.get(1).map(|&g| g as f64);
        if let Some(saved) = &mut self.saved {
            saved.state = trainer.state.clone();
        }
        #[derive(Serialize)]
        struct Report {
            step: usize,
            total_steps: usize,
            epoch: usize,
            loss: f64,
            lr: f64,
            tokens: usize,
            trained_tokens: usize,
            grad_norm: Option<f64>,
            done: bool,
            /// Preference runs: TRL's metrics of the step.
            #[serde(skip_serializing_if = "Option::is_none")]
            preference: Option<DpoMetrics>,
        }
        to_js(&Report {
            step: r.step,
            total_steps: r.total_steps,
            epoch: r.epoch,
            loss: r.loss,
            lr: r.lr,
            tokens: r.tokens,
            trained_tokens: r.trained_tokens,
            grad_norm: r.grad_norm,
            done: trainer.done(),
            preference: r.preference,
        })
    }

    /// Loss and perplexity on the held-out examples: {loss, perplexity, tokens}, or null without
    /// any; preference runs: the loss and TRL's metrics on the held-out pairs.
    pub async fn evaluate(&mut self) -> Result<JsValue, JsError> {
        let trainer = self.trainer.as_ref().ok_or_else(|| JsError::new("prepare first"))?;
        if let Some(dpo) = trainer.cfg.dpo {
            if self.eval_pairs.is_empty() {
                return Ok(JsValue::NULL);
            }
            let model = trainer.eval_model();
            let policy = pair_sums_async(&model, &self.eval_pairs, dpo.loss_type.whole_sequences(), trainer.cfg.batch_size, trainer.cfg.pad_id).await.map_err(js_err)?;
            let lens: Vec<(usize, usize)> = self.eval_pairs.iter().map(|[c, r]| (c.completion_len(), r.completion_len())).collect();
            let metrics = preference_loss(dpo, &policy, &self.eval_reference, &lens).metrics;
            let step = trainer.state.step;
            self.track_eval(metrics.loss, step);
            return to_js(&metrics);
        }
        if self.eval.is_empty() {
            return Ok(JsValue::NULL);
        }
        let model = trainer.eval_model();
        let (sum, count) = evaluate_pending(&model, &self.eval, trainer.cfg.batch_size, trainer.cfg.pad_id, &self.device);
        let report = eval_report(read_f32(sum).await.map_err(js_err)?[0] as f64, count);
        let step = trainer.state.step;
        self.track_eval(report.loss, step);
        to_js(&report)
    }

    /// The checkpoint's files (adapter, optimizer moments, trainer state), as a Map name → bytes.
    pub async fn checkpoint(&self) -> Result<js_sys::Map, JsError> {
        let trainer = self.trainer.as_ref().ok_or_else(|| JsError::new("prepare first"))?;
        let saved = self.saved.as_ref().expect("set with the trainer");
        let adapter = trainer.adapter_async(&self.name).await.map_err(js_err)?;
        let moments = trainer.optimizer_state_async().await.map_err(js_err)?;
        Ok(files_to_map(checkpoint_files(&adapter, None, moments, saved)))
    }

    /// Continues from a checkpoint's files; `prepare` must have been called with the same
    /// settings and data. Returns the step it resumes at.
    pub fn restore(&mut self, files: js_sys::Map) -> Result<usize, JsError> {
        let trainer = self.trainer.as_mut().ok_or_else(|| JsError::new("prepare first"))?;
        let set = map_to_files("checkpoint", files)?;
        let loaded = checkpoint::read(&set).map_err(js_err)?;
        if loaded.saved.config != trainer.cfg {
            return Err(JsError::new("the checkpoint was made with other training settings; resume with the same ones"));
        }
        // A PiSSA run's adapter belongs on the residual base: resume it only onto that one.
        if loaded.adapter.pissa != self.initial.as_ref().is_some_and(|i| i.pissa) {
            return Err(JsError::new("the checkpoint was made with another initialisation (PiSSA or not); resume with the same settings"));
        }
        trainer.restore(&loaded.adapter, loaded.moments, loaded.saved.state.clone()).map_err(js_err)?;
        let step = trainer.state.step;
        self.saved = Some(loaded.saved);
        Ok(step)
    }

    /// The adapter as PEFT's two files (adapter_config.json, adapter_model.safetensors);
    /// `base_model_name_or_path` defaults to the model's name.
    pub async fn adapter(&self, base_model_name_or_path: Option<String>) -> Result<js_sys::Map, JsError> {
        Ok(files_to_map(adapter_files(&self.host_adapter(base_model_name_or_path).await?)))
    }

    /// The adapter as llama.cpp's LoRA GGUF (what `hone export --gguf` writes), with `name` as
    /// its `general.name`.
    pub async fn adapter_gguf(&self, base_model_name_or_path: Option<String>, name: String) -> Result<js_sys::Uint8Array, JsError> {
        let adapter = self.host_adapter(base_model_name_or_path).await?;
        let out = hone::export::gguf_lora::lora_to_gguf(&adapter, &self.config, &name).map_err(js_err)?;
        Ok(js_sys::Uint8Array::from(out.bytes.as_slice()))
    }

    /// Greedy generation for a prompt (rendered with the chat template when there is one),
    /// with the fine-tuned adapter or with the base model alone: `{text, ids}`. With
    /// `ignore_eos` it runs past the end-of-turn tokens (as llama.cpp's `--ignore-eos`).
    pub async fn generate(&mut self, prompt: String, max_new_tokens: usize, with_adapter: bool, ignore_eos: bool, settings: JsValue) -> Result<JsValue, JsError> {
        let model = self.generation_model(with_adapter, settings)?;
        let tok = &self.text.tokenizer;
        let ids = match &self.text.template {
            Some(t) => {
                let r = t.render(&[Message { role: "user".into(), content: prompt }], true).map_err(js_err)?;
                tok.encode(&r.text, false).map_err(js_err)?
            }
            None => tok.encode(&prompt, true).map_err(js_err)?,
        };
        let stop_ids = if ignore_eos { Vec::new() } else { self.text.stop_ids.clone() };
        let cfg = GenerateConfig { max_new_tokens, stop_ids, ..Default::default() };
        let out = generate_async(&model, &ids, &cfg).await.map_err(js_err)?;
        #[derive(Serialize)]
        struct Generated {
            text: String,
            ids: Vec<u32>,
        }
        to_js(&Generated { text: tok.decode(&out, true).map_err(js_err)?, ids: out })
    }

    /// `hone compare` in the page: the base and (after training) the fine-tuned model on a
    /// held-out file (JSONL; `options.name` names it) — loss and perplexity, a greedy reply per
    /// held-out prompt (batched) scored against its reference, the general text's perplexity
    /// (forgetting). Options: `name`, `maxNewTokens` (64), `batchSize` (8, prompts decoded
    /// together), `limit` (all), `checks` (`["json", "regex:^Ahoy"]`), `blind` (with `seed`).
    /// Resolves to `{summary, report, files}`: the Markdown table, the report as JSON and its
    /// files (report.html, report.md, report.json, and the blind sheet) by name.
    pub async fn compare(&mut self, held_out: String, options: JsValue, settings: JsValue) -> Result<JsValue, JsError> {
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase", default)]
        struct Options {
            name: Option<String>,
            max_new_tokens: Option<usize>,
            batch_size: Option<usize>,
            limit: Option<usize>,
            checks: Vec<String>,
            blind: bool,
            seed: u64,
        }
        let o: Options = if options.is_undefined() || options.is_null() { Options::default() } else { serde_wasm_bindgen::from_value(options).map_err(|e| JsError::new(&format!("compare options: {e}")))? };
        let name = o.name.unwrap_or_else(|| "held-out data".into());
        let s = match &self.trainer {
            Some(_) => self.settings.clone(),
            None => parse_settings(settings.clone())?,
        };
        let held_out = renamed(held_out, &name, &s)?;
        let checks = o.checks.iter().map(|c| Check::parse(c)).collect::<hone::Result<Vec<_>>>().map_err(js_err)?;
        let (tok, template) = (&self.text.tokenizer, self.text.template.as_ref());
        let examples = hone::data::dataset::parse_jsonl(&held_out, &name, None, false).map_err(js_err)?.0;
        let held = HeldOut::new(&examples, &name, tok, template, s.max_len, o.limit).map_err(js_err)?;
        let general = general_samples(GENERAL, tok, template, s.max_len, self.config.max_position_embeddings).map_err(js_err)?;
        let max_new_tokens = o.max_new_tokens.unwrap_or(64);
        let cfg = GenerateConfig { max_new_tokens, stop_ids: self.text.stop_ids.clone(), ..Default::default() };
        let (batch, gen_batch, pad) = (4, o.batch_size.unwrap_or(8), pad_id(tok));
        let prompt_ids = held.prompt_ids();
        let mut variants = vec![("base", false)];
        if self.trainer.is_some() {
            variants.push(("fine-tuned", true));
        }
        let mut measured = Vec::new();
        for &(_, with_adapter) in &variants {
            let model = self.generation_model(with_adapter, settings.clone())?;
            let eval = |samples: &[Sample]| {
                let (sum, count) = evaluate_pending(&model, samples, batch, pad, &self.device);
                async move { Ok::<_, JsError>(eval_report(read_f32(sum).await.map_err(js_err)?[0] as f64, count)) }
            };
            let held_out = eval(&held.samples).await?;
            let general = eval(&general).await?;
            let started = js_sys::Date::now();
            let replies = generate_batch_async(&model, &prompt_ids, &cfg, gen_batch).await.map_err(js_err)?;
            measured.push(Measured { held_out, general, replies, seconds: (js_sys::Date::now() - started) / 1000.0 });
        }
        let tok = &self.text.tokenizer;
        let mut comparison = Comparison::new(&held, checks);
        for ((variant, _), m) in variants.iter().zip(&measured) {
            comparison.add(variant, None, m, tok).map_err(js_err)?;
        }
        let report = comparison.report(self.name.clone(), name, "bundled public-domain sample".into(), "greedy".into(), max_new_tokens);
        #[derive(Serialize)]
        struct Compared<'a> {
            summary: String,
            report: &'a hone::compare::Report,
            files: std::collections::BTreeMap<&'static str, String>,
        }
        let files = report.files(o.blind.then_some(o.seed)).into_iter().map(|(n, b)| (n, String::from_utf8(b).expect("text"))).collect();
        to_js(&Compared { summary: report.summary(), report: &report, files })
    }
}

impl Session {
    /// The model to generate with: the one being trained once training started (with its
    /// adapter or without: the base alone), else the base the settings choose.
    fn generation_model(&mut self, with_adapter: bool, settings: JsValue) -> Result<CausalLm<Backend>, JsError> {
        let mut model = match &self.trainer {
            // After training starts, the base is the one being trained.
            Some(t) => t.eval_model(),
            // Before, the base the settings choose (NF4 or f32), loaded once per choice.
            None => {
                let s = parse_settings(settings)?;
                let nf4 = s.nf4().map_err(js_err)?.is_some();
                if self.model.as_ref().is_none_or(|(q, _)| *q != nf4) {
                    self.model = None;
                    self.model = Some((nf4, self.load_weights::<Backend>(&s)?));
                }
                self.model.as_ref().expect("just loaded").1.clone()
            }
        };
        if !with_adapter {
            for (_, l) in model.linears_mut() {
                l.lora = None;
            }
            // PiSSA trains on a residual base: its start adds the rest of the original back.
            if let Some(initial) = self.initial.as_ref().filter(|i| i.pissa && self.trainer.is_some()) {
                initial.attach(model.linears_mut()).map_err(js_err)?;
            }
        }
        Ok(model)
    }

    /// The trained adapter on the host; `base_model_name_or_path` defaults to the model's name.
    async fn host_adapter(&self, base_model_name_or_path: Option<String>) -> Result<hone::lora::peft::Adapter, JsError> {
        let trainer = self.trainer.as_ref().ok_or_else(|| JsError::new("prepare first"))?;
        let base = base_model_name_or_path.filter(|b| !b.is_empty()).unwrap_or_else(|| self.name.clone());
        let adapter = trainer.adapter_async(&base).await.map_err(js_err)?;
        // Trained on PiSSA's residual: saved as PEFT converts it, a LoRA of the original base.
        match self.initial.as_ref().filter(|i| i.pissa) {
            Some(initial) => adapter.with_initial_subtracted(initial).map_err(js_err),
            None => Ok(adapter),
        }
    }

    /// Keeps the best held-out loss and how many evaluations went without improving it.
    fn track_eval(&mut self, loss: f64, step: usize) {
        if let Some(saved) = &mut self.saved {
            if saved.best_eval_loss.is_none_or(|b| loss < b) {
                saved.best_eval_loss = Some(loss);
                saved.best_step = Some(step);
                saved.evals_without_improvement = 0;
            } else {
                saved.evals_without_improvement += 1;
            }
        }
    }

    /// `prepare` for DPO and ORPO: preference pairs tokenized as TRL's trainers do, and DPO's
    /// reference log-probabilities of the training and the held-out pairs from the model as it
    /// starts (the base: a new adapter's B is zero), read back without blocking.
    async fn prepare_preference(&mut self, data: String, eval_data: Option<String>, s: RunSettings, dpo: DpoConfig) -> Result<JsValue, JsError> {
        let cfg = s.train(pad_id(&self.text.tokenizer)).map_err(js_err)?;
        if !cfg.checkpointing {
            return Err(JsError::new("DPO and ORPO in the page run with activation checkpointing on"));
        }
        let (tok, template) = (&self.text.tokenizer, self.text.template.as_ref());
        let train = pairs_from_jsonl(&data, "dataset", false, tok, template, s.max_len, dpo.loss_type).map_err(js_err)?;
        let (pairs, eval_pairs, dropped) = match (eval_data, s.eval_split) {
            (Some(e), _) if !e.trim().is_empty() => {
                let e = pairs_from_jsonl(&e, "eval dataset", false, tok, template, s.max_len, dpo.loss_type).map_err(js_err)?;
                (train.pairs, e.pairs, train.dropped + e.dropped)
            }
            (_, Some(f)) if f > 0.0 && f < 1.0 && train.pairs.len() > 1 => {
                let (t, e) = run::split_eval(train.pairs, f, s.seed());
                (t, e, train.dropped)
            }
            _ => (train.pairs, Vec::new(), train.dropped),
        };
        let (model, lora, adapted) = self.adapted_model(&s)?;
        let (reference, eval_reference) = if dpo.loss_type.needs_reference() {
            use burn::module::AutodiffModule;
            let start = model.valid();
            let (batch, pad) = (cfg.batch_size, cfg.pad_id);
            let train = pair_sums_async(&start, &pairs, false, batch, pad).await.map_err(js_err)?.completion;
            (train, pair_sums_async(&start, &eval_pairs, false, batch, pad).await.map_err(js_err)?.completion)
        } else {
            (Vec::new(), Vec::new())
        };
        let trainer = Trainer::with_reference(model, lora, pairs, reference, cfg, self.device.clone()).map_err(js_err)?;
        let counts = (eval_pairs.len(), dropped, train.skipped, adapted);
        self.eval = Vec::new();
        self.eval_pairs = eval_pairs;
        self.eval_reference = eval_reference;
        self.start(trainer, s, counts)
    }

    /// The base with fresh LoRA adapters as `s` says, and how many layers they adapt (the
    /// generation-only model goes: training brings its own copy of the base).
    fn adapted_model(&mut self, s: &RunSettings) -> Result<(CausalLm<Train>, hone::lora::LoraConfig, usize), JsError> {
        self.model = None;
        self.initial = None;
        let lora = s.lora();
        let (mut model, initial) = match (lora.init, &self.weights) {
            (Init::Default, _) => (self.load_weights::<Train>(s)?, None),
            (init, Weights::Dir(files)) => {
                let name = init.name();
                if lora.use_dora {
                    return Err(JsError::new(&format!("settings: init = {name} with DoRA is not supported yet")));
                }
                let options = LoadOptions { nf4: s.nf4().map_err(js_err)? };
                if init == Init::Loftq && options.nf4.is_none() {
                    return Err(JsError::new("settings: LoftQ starts the adapter from NF4's quantization error: it is for NF4 (QLoRA) base weights"));
                }
                let (model, initial) = hone::model::init_source::load_with_init::<Train>(files, options, &lora, &self.name, &self.device).map_err(js_err)?;
                (model, Some(initial))
            }
            (init, Weights::Gguf(_)) => {
                return Err(JsError::new(&format!(
                    "settings: init = {} needs the original 16/32-bit weights, and a GGUF file holds llama.cpp's (mostly quantized) ones: pick the Hugging Face model folder",
                    init.name()
                )))
            }
        };
        let adapted = add_adapters(model.linears_mut(), &lora);
        if adapted == 0 {
            return Err(JsError::new(&format!("targets {:?} match no layer of this model", s.targets.as_deref().unwrap_or("all-linear"))));
        }
        if let Some(initial) = &initial {
            initial.attach(model.linears_mut()).map_err(js_err)?;
        }
        self.initial = initial;
        Ok((model, lora, adapted))
    }

    /// Keeps the prepared trainer and a fresh saved state; `counts` are (held-out examples,
    /// truncated or dropped, skipped, adapted layers), for the page.
    fn start(&mut self, trainer: Trainer<Train>, s: RunSettings, (eval_examples, truncated, skipped, adapted_layers): (usize, usize, usize, usize)) -> Result<JsValue, JsError> {
        let total_steps = trainer.state.total_steps;
        let prepared = Prepared {
            train_examples: trainer.data_len(),
            eval_examples,
            truncated,
            skipped,
            total_steps,
            eval_every: run::eval_every(&s, total_steps, eval_examples > 0),
            adapted_layers,
        };
        self.saved = Some(SavedState {
            state: trainer.state.clone(),
            config: trainer.cfg.clone(),
            base_model: self.name.clone(),
            best_eval_loss: None,
            best_step: None,
            evals_without_improvement: 0,
            reference_logps: trainer.reference_logps().to_vec(),
        });
        self.trainer = Some(trainer);
        self.settings = s;
        to_js(&prepared)
    }

    /// The memory plan for these settings, sequences at most the model's context long.
    fn plan(&self, s: &RunSettings) -> Result<plan::MemoryPlan, JsError> {
        let cfg = s.train(0).map_err(js_err)?;
        let seq = s.max_len.unwrap_or(256).min(self.config.max_position_embeddings);
        let options = plan::PlanOptions {
            // DPO and ORPO: two sequences (chosen, rejected) per pair.
            batch: if cfg.dpo.is_some() { 2 * cfg.batch_size } else { cfg.batch_size },
            seq,
            nf4: s.nf4().map_err(js_err)?.is_some(),
            checkpointing: cfg.checkpointing,
            device: plan::Device::Gpu,
            logits_chunk: cfg.logits_chunk,
            optim: cfg.optim,
            min_8bit_size: cfg.min_8bit_size,
            // An untied embedding table stays in the wasm heap (`HoneBackend::tables_on_host`).
            host_tables: true,
        };
        Ok(plan::plan(&self.config, &s.lora(), &options))
    }

    /// Reads the weights tensor by tensor from the picked files (quantizing to NF4 as they come).
    fn load_weights<B: HoneBackend<Device = WgpuDevice>>(&self, s: &RunSettings) -> Result<CausalLm<B>, JsError> {
        let options = LoadOptions { nf4: s.nf4().map_err(js_err)? };
        let model = match &self.weights {
            Weights::Dir(files) => hone::model::load_model_with::<B>(files, options, &self.device),
            Weights::Gguf(g) => hone::model::gguf::load_gguf_with_report::<B>(g, options, &self.device).map(|(m, _)| m),
        };
        model.map_err(js_err)
    }
}

fn parse_settings(v: JsValue) -> Result<RunSettings, JsError> {
    if v.is_undefined() || v.is_null() {
        return Ok(RunSettings::default());
    }
    let s: RunSettings = serde_wasm_bindgen::from_value(v).map_err(|e| JsError::new(&format!("settings: {e}")))?;
    s.init().map_err(|e| JsError::new(&e.to_string()))?;
    Ok(s)
}

/// The dataset with the settings' column renames (`columns`) applied.
fn renamed(data: String, file: &str, s: &RunSettings) -> Result<String, JsError> {
    let columns = s.columns().map_err(js_err)?;
    if columns.is_empty() {
        return Ok(data);
    }
    hone::data::table::rename_jsonl(&data, file, &columns).map_err(js_err)
}

fn map_to_files(location: &str, files: js_sys::Map) -> Result<MemFiles, JsError> {
    let mut set = MemFiles::new(location);
    for entry in files.entries() {
        let pair: js_sys::Array = entry.map_err(|_| JsError::new("bad files map"))?.into();
        let name = pair.get(0).as_string().ok_or_else(|| JsError::new("file names must be strings"))?;
        set.insert(name, js_sys::Uint8Array::new(&pair.get(1)).to_vec());
    }
    Ok(set)
}

/// The WebGPU device, and the largest buffer it allows (cubecl requests the adapter's own limits).
async fn device_with_limits() -> (WgpuDevice, u64) {
    let d = device().await;
    let limits = crate::LIMITS.with(|l| *l.borrow());
    (d, limits)
}
