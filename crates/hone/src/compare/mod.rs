//! Comparing the base model with fine-tuned adapters on held-out data (`hone compare` and the
//! page's "Compare on held-out data"): the held-out rows as loss samples and as prompts with
//! their references, the general text whose perplexity shows forgetting, each variant's replies
//! scored (crate::score), and the report. How the model runs (sync natively, awaiting reads in
//! the browser) stays with the callers.

pub mod report;

use crate::data::dataset::{encode, prompt_and_reference, EncodeOptions, Example};
use crate::data::template::ChatTemplate;
use crate::data::tokenizer::Tokenizer;
use crate::data::Sample;
use crate::score::{score, Check};
use crate::train::trainer::EvalReport;
use crate::Result;
pub use report::{Report, Row, Variant};

/// Bundled general text (public-domain prose), one passage per line, for the forgetting figure.
pub const GENERAL: &str = include_str!("../../../../data/general/public_domain.txt");

/// One held-out prompt to generate from.
pub struct Prompt {
    pub ids: Vec<u32>,
    /// As a person reads it in the report: the user's last turn, or the prompt text.
    pub text: String,
    pub reference: String,
}

/// The held-out rows: every row as a loss sample, and the rows with a reference as prompts.
pub struct HeldOut {
    pub samples: Vec<Sample>,
    pub prompts: Vec<Prompt>,
}

impl HeldOut {
    /// From parsed rows (`what` names them in errors); at most `limit` prompts.
    pub fn new(examples: &[Example], what: &str, tok: &Tokenizer, template: Option<&ChatTemplate>, max_len: Option<usize>, limit: Option<usize>) -> Result<HeldOut> {
        let eos = template.and_then(|t| t.eos_token.clone());
        let opts = EncodeOptions { train_on_completions_only: true, max_len };
        let samples = examples.iter().map(|e| encode(e, tok, template, eos.as_deref(), opts)).collect::<Result<Vec<Sample>>>()?;
        crate::train::run::require_eval_targets(&samples, what)?;
        let mut prompts = Vec::new();
        for e in examples {
            if let Some((ids, reference)) = prompt_and_reference(e, tok, template)? {
                prompts.push(Prompt { ids, text: prompt_text(e), reference });
            }
        }
        if prompts.is_empty() {
            return Err(crate::Error::format(what, "no row has a prompt and a reference (prompt/completion rows, or chats ending with an assistant turn)"));
        }
        prompts.truncate(limit.unwrap_or(usize::MAX));
        Ok(HeldOut { samples, prompts })
    }

    pub fn prompt_ids(&self) -> Vec<Vec<u32>> {
        self.prompts.iter().map(|p| p.ids.clone()).collect()
    }
}

/// The general text as samples, every token counted, one per non-empty line, each at most
/// `max_len` tokens (256 when unset) and the model's `context`.
pub fn general_samples(text: &str, tok: &Tokenizer, template: Option<&ChatTemplate>, max_len: Option<usize>, context: usize) -> Result<Vec<Sample>> {
    let opts = EncodeOptions { train_on_completions_only: false, max_len: Some(max_len.unwrap_or(256).min(context)) };
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| encode(&Example::Text(l.to_string()), tok, template, None, opts)).collect()
}

/// What one variant (the base, or the base with an adapter) did.
pub struct Measured {
    pub held_out: EvalReport,
    pub general: EvalReport,
    /// New tokens per prompt, in the prompts' order.
    pub replies: Vec<Vec<u32>>,
    /// Seconds spent generating them.
    pub seconds: f64,
}

impl Measured {
    /// Tokens generated, and their rate.
    pub fn generated(&self) -> (usize, f64) {
        let n: usize = self.replies.iter().map(Vec::len).sum();
        (n, n as f64 / self.seconds.max(1e-9))
    }
}

/// Collects the variants, in order (the base first), and their replies into a report.
pub struct Comparison<'a> {
    held: &'a HeldOut,
    checks: Vec<Check>,
    variants: Vec<Variant>,
    replies: Vec<Vec<String>>,
}

impl<'a> Comparison<'a> {
    pub fn new(held: &'a HeldOut, checks: Vec<Check>) -> Self {
        Comparison { held, checks, variants: Vec::new(), replies: vec![Vec::new(); held.prompts.len()] }
    }

    /// Scores one variant's replies; returns its generation speed in tokens/s.
    pub fn add(&mut self, name: &str, adapter: Option<String>, m: &Measured, tok: &Tokenizer) -> Result<f64> {
        let (_, tokens_per_s) = m.generated();
        let mut scores = Vec::new();
        for (i, ids) in m.replies.iter().enumerate() {
            let reply = tok.decode(ids, true)?.trim().to_string();
            scores.push(score(&reply, &self.held.prompts[i].reference, &self.checks));
            self.replies[i].push(reply);
        }
        self.variants.push(Variant::new(name, adapter, &m.held_out, &m.general, &scores, tokens_per_s));
        Ok(tokens_per_s)
    }

    /// The report; `model`, `data` and `general` name the inputs, `decoding` how replies were made.
    pub fn report(self, model: String, data: String, general: String, decoding: String, max_new_tokens: usize) -> Report {
        let rows = self.held.prompts.iter().zip(self.replies).map(|(p, replies)| Row { prompt: p.text.clone(), reference: p.reference.clone(), replies }).collect();
        Report { model, data, general, checks: self.checks.iter().map(Check::name).collect(), decoding, max_new_tokens, variants: self.variants, rows }
    }
}

fn prompt_text(e: &Example) -> String {
    match e {
        Example::Text(t) => t.clone(),
        Example::Completion { prompt, .. } => prompt.clone(),
        Example::Chat(m) => m.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default(),
    }
}
