//! Training data: JSONL in four formats, turned into token ids and labels the way TRL's
//! SFTTrainer does (tests/fixtures/chat holds TRL's own output for comparison).
//!
//! - `{"text"}`: the text plus EOS, all trained on.
//! - `{"prompt", "completion"}`: EOS added to the completion; loss on the completion only by
//!   default (from where the tokenized prompt and prompt+completion diverge).
//! - `{"messages": [{"role", "content"}…]}`: rendered with the model's chat template; loss on
//!   assistant turns only by default (the template's `{% generation %}` blocks, or, for
//!   templates without them, the text each assistant turn adds to the rendering).
//! - alpaca `{"instruction", "input", "output"}`: the Alpaca prompt, then as prompt/completion.

use super::template::{ChatTemplate, Message};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::train::loss::IGNORE_INDEX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Completion,
    Chat,
    Alpaca,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "text" => Format::Text,
            "completion" => Format::Completion,
            "chat" => Format::Chat,
            "alpaca" => Format::Alpaca,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Completion => "completion",
            Format::Chat => "chat",
            Format::Alpaca => "alpaca",
        }
    }
    fn detect(v: &serde_json::Value) -> Option<Self> {
        let has = |k: &str| v.get(k).is_some();
        if has("messages") {
            Some(Format::Chat)
        } else if has("prompt") && has("completion") {
            Some(Format::Completion)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String),
    Completion { prompt: String, completion: String },
    Chat(Vec<Message>),
}

/// A tokenized example: ids and labels (`IGNORE_INDEX` where there is no loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    /// Loss only on completions / assistant turns (TRL's `completion_only_loss` and
    /// `assistant_only_loss`).
    pub train_on_completions_only: bool,
    pub max_len: Option<usize>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { train_on_completions_only: true, max_len: None }
    }
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn field<'a>(v: &'a serde_json::Value, key: &str, at: &str) -> Result<&'a str> {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(Error::format(at, format!("field `{key}` must be a string"))),
        None => Err(Error::format(at, format!("missing field `{key}`"))),
    }
}

/// Parses one JSONL line. `at` is `file:line` for messages.
pub fn parse_line(line: &str, format: Option<Format>, at: &str) -> Result<Example> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::format(at, format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(at, "each line must be a JSON object"));
    }
    let format = match format.or_else(|| Format::detect(&v)) {
        Some(f) => f,
        None => return Err(Error::format(at, "unknown format: expected `text`, `prompt`+`completion`, `messages`, or `instruction`+`output`")),
    };
    Ok(match format {
        Format::Text => Example::Text(field(&v, "text", at)?.to_string()),
        Format::Completion => Example::Completion { prompt: field(&v, "prompt", at)?.to_string(), completion: field(&v, "completion", at)?.to_string() },
        Format::Alpaca => {
            let instruction = field(&v, "instruction", at)?;
            let input = match v.get("input") {
                None | Some(serde_json::Value::Null) => "",
                Some(_) => field(&v, "input", at)?,
            };
            let template = if input.is_empty() { ALPACA_NO_INPUT } else { ALPACA_WITH_INPUT };
            Example::Completion {
                prompt: template.replace("{instruction}", instruction).replace("{input}", input),
                completion: field(&v, "output", at)?.to_string(),
            }
        }
        Format::Chat => Example::Chat(messages(&v, "messages", at)?),
    })
}

/// The non-empty list of `{"role", "content"}` messages in field `key`.
pub(crate) fn messages(v: &serde_json::Value, key: &str, at: &str) -> Result<Vec<Message>> {
    let list = v.get(key).and_then(|m| m.as_array()).ok_or_else(|| Error::format(at, format!("`{key}` must be a list")))?;
    if list.is_empty() {
        return Err(Error::format(at, format!("`{key}` is empty")));
    }
    let mut messages = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let here = format!("{at}: {key}[{i}]");
        let role = field(m, "role", &here)?;
        if !ROLES.contains(&role) {
            return Err(Error::format(&here, format!("unknown role `{role}` (expected one of {ROLES:?})")));
        }
        messages.push(Message { role: role.to_string(), content: field(m, "content", &here)?.to_string() });
    }
    Ok(messages)
}

/// Parses a JSONL file's text. With `skip_bad_lines`, bad lines are counted and skipped;
/// otherwise the first is an error naming `file:line`. Blank lines are ignored.
pub fn parse_jsonl(text: &str, file: &str, format: Option<Format>, skip_bad_lines: bool) -> Result<(Vec<Example>, usize)> {
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, format, &format!("{file}:{}", i + 1)) {
            Ok(e) => examples.push(e),
            Err(e) if skip_bad_lines => {
                let _ = e;
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if examples.is_empty() {
        return Err(Error::format(file, if skipped > 0 { format!("no usable examples ({skipped} bad lines skipped)") } else { "empty dataset".to_string() }));
    }
    Ok((examples, skipped))
}

pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokens that overlap any of `spans` (byte ranges), as transformers' assistant masks.
fn mask_from_spans(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    offsets.iter().map(|&(s, e)| spans.iter().any(|&(a, b)| s < b && e > a && e > s)).collect()
}

/// Tokenizes one example. `eos` is the tokenizer's EOS text (tokenizer_config.json), needed for
/// text and completion formats; `template` for chat.
pub fn encode(example: &Example, tok: &Tokenizer, template: Option<&ChatTemplate>, eos: Option<&str>, opts: EncodeOptions) -> Result<Sample> {
    let with_eos = |s: &str| -> String {
        match eos {
            Some(e) if !s.ends_with(e) => format!("{s}{e}"),
            _ => s.to_string(),
        }
    };
    let (ids, trained): (Vec<u32>, Vec<bool>) = match example {
        Example::Text(t) => {
            let ids = tok.encode(&with_eos(t), true)?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        Example::Completion { prompt, completion } => {
            let prompt_ids = tok.encode(prompt, true)?;
            let ids = tok.encode(&format!("{prompt}{}", with_eos(completion)), true)?;
            let split = common_prefix(&prompt_ids, &ids);
            let trained = (0..ids.len()).map(|i| !opts.train_on_completions_only || i >= split).collect();
            (ids, trained)
        }
        Example::Chat(messages) => {
            let template = template.ok_or_else(|| Error::format("tokenizer_config.json", "chat data needs a chat template, and the model has none"))?;
            let rendered = template.render(messages, false)?;
            let (ids, offsets) = tok.encode_with_offsets(&rendered.text, false)?;
            let trained = if !opts.train_on_completions_only {
                vec![true; ids.len()]
            } else {
                let spans = if template.has_generation_markers { rendered.generation_spans } else { assistant_spans(template, messages)? };
                mask_from_spans(&offsets, &spans)
            };
            (ids, trained)
        }
    };
    let labels = ids.iter().zip(&trained).map(|(&id, &t)| if t { id as i64 } else { IGNORE_INDEX }).collect();
    let mut sample = Sample { input_ids: ids, labels };
    if let Some(max) = opts.max_len {
        sample.input_ids.truncate(max);
        sample.labels.truncate(max);
    }
    Ok(sample)
}

/// What a model is asked and what it should answer, for generating from held-out data as the
/// example was trained: a completion example's prompt (special tokens added, as `encode` does)
/// and its completion; a chat's turns before its last assistant turn, rendered with the
/// generation prompt, and that turn's content. None for plain text, or a chat that does not end
/// with an assistant turn.
pub fn prompt_and_reference(example: &Example, tok: &Tokenizer, template: Option<&ChatTemplate>) -> Result<Option<(Vec<u32>, String)>> {
    Ok(match example {
        Example::Text(_) => None,
        Example::Completion { prompt, completion } => Some((tok.encode(prompt, true)?, completion.clone())),
        Example::Chat(messages) => match messages.split_last() {
            Some((last, before)) if last.role == "assistant" && !before.is_empty() => {
                let template = template.ok_or_else(|| Error::format("tokenizer_config.json", "chat data needs a chat template, and the model has none"))?;
                let rendered = template.render(before, true)?;
                Some((tok.encode(&rendered.text, false)?, last.content.clone()))
            }
            _ => None,
        },
    })
}

/// For templates without generation markers: each assistant turn's span is what rendering it
/// adds after the prompt that precedes it (rendered with the generation prompt).
fn assistant_spans(template: &ChatTemplate, messages: &[Message]) -> Result<Vec<(usize, usize)>> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?.text;
        let after = template.render(&messages[..=i], false)?.text;
        if after.starts_with(&before) {
            spans.push((before.len(), after.len()));
        }
    }
    Ok(spans)
}
