//! Preference pairs (for DPO and ORPO): JSONL in TRL's three formats, tokenized as TRL 1.16's
//! DPOTrainer ([`encode_pair`]) or its ORPO trainer ([`encode_orpo_pair`]) does
//! (tests/fixtures/preference holds TRL's own output for comparison).
//!
//! - `{"prompt", "chosen", "rejected"}`, strings: EOS added to each completion (unless it ends
//!   with it), the prompt tokenized with the tokenizer's special tokens (BOS).
//! - The same with lists of messages (conversational): the prompt rendered with the model's
//!   chat template and its generation prompt, each completion rendered after it.
//! - `{"chosen", "rejected"}` alone (implicit prompt): the prompt is their longest common prefix,
//!   of characters or of messages, as TRL's `extract_prompt` finds it.
//!
//! In every format a completion starts where the tokenized prompt and the tokenized
//! prompt+completion first differ (tokens can merge across the boundary), taking the earlier of
//! the two completions' points, as TRL does.
//!
//! ORPO's trainer tokenizes text rather than ids: the prompt and each prompt+completion without
//! special tokens (conversations rendered to text first, the prompt cut to the characters both
//! renderings share), each sequence keeping its own prompt/completion boundary, then BOS put
//! before each sequence and EOS after each completion unless already there.

use super::dataset::{common_prefix, messages, Sample};
use super::template::{ChatTemplate, Message};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::train::loss::IGNORE_INDEX;

/// A prompt or completion: text, or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    fn is_empty(&self) -> bool {
        match self {
            Turns::Text(t) => t.is_empty(),
            Turns::Messages(m) => m.is_empty(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
}

impl PreferenceExample {
    pub fn is_conversational(&self) -> bool {
        matches!(self.chosen, Turns::Messages(_))
    }
}

/// A tokenized pair: the shared prompt and each completion.
#[derive(Debug, Clone, PartialEq)]
pub struct PairSample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// One sequence of a pair: prompt + completion ids, and which tokens are the completion's.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub completion: Vec<bool>,
}

impl Sequence {
    pub fn completion_len(&self) -> usize {
        self.completion.iter().filter(|&&c| c).count()
    }

    /// Tokens before the completion.
    pub fn prompt_len(&self) -> usize {
        self.completion.iter().take_while(|&&c| !c).count()
    }

    /// Cut to `max` tokens, keeping the start (TRL's default `truncation_mode`).
    pub fn truncate(&mut self, max: usize) {
        self.ids.truncate(max);
        self.completion.truncate(max);
    }

    fn new(prompt: &[u32], completion: &[u32]) -> Sequence {
        Sequence { ids: prompt.iter().chain(completion).copied().collect(), completion: prompt.iter().map(|_| false).chain(completion.iter().map(|_| true)).collect() }
    }

    /// As a training sample: labels on the completion only.
    pub fn sample(&self) -> Sample {
        Sample { input_ids: self.ids.clone(), labels: self.ids.iter().zip(&self.completion).map(|(&id, &c)| if c { id as i64 } else { IGNORE_INDEX }).collect() }
    }
}

impl PairSample {
    /// The chosen and the rejected sequence, each cut to `max_len` tokens keeping the start (TRL's
    /// default `truncation_mode`).
    pub fn sequences(&self, max_len: Option<usize>) -> [Sequence; 2] {
        [&self.chosen_ids, &self.rejected_ids].map(|completion| {
            let mut s = Sequence::new(&self.prompt_ids, completion);
            if let Some(max) = max_len {
                s.truncate(max);
            }
            s
        })
    }
}

/// Field `key` as text or messages.
fn turns(v: &serde_json::Value, key: &str, at: &str) -> Result<Turns> {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => Ok(Turns::Text(s.clone())),
        Some(serde_json::Value::Array(_)) => Ok(Turns::Messages(messages(v, key, at)?)),
        Some(_) => Err(Error::format(at, format!("field `{key}` must be a string or a list of messages"))),
        None => Err(Error::format(at, format!("missing field `{key}` (a preference pair needs `chosen` and `rejected`)"))),
    }
}

/// Parses one JSONL line of a preference dataset. `at` is `file:line` for messages.
pub fn parse_preference_line(line: &str, at: &str) -> Result<PreferenceExample> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::format(at, format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(at, "each line must be a JSON object"));
    }
    let (chosen, rejected) = (turns(&v, "chosen", at)?, turns(&v, "rejected", at)?);
    for (name, t) in [("chosen", &chosen), ("rejected", &rejected)] {
        if t.is_empty() {
            return Err(Error::format(at, format!("`{name}` is empty")));
        }
    }
    let conversational = matches!(chosen, Turns::Messages(_));
    if conversational != matches!(rejected, Turns::Messages(_)) {
        return Err(Error::format(at, "`chosen` and `rejected` must both be text or both be messages"));
    }
    // TRL's `maybe_extract_prompt`: an explicit prompt of the completions' kind is used as is;
    // otherwise the prompt is what chosen and rejected share.
    let prompt = match v.get("prompt") {
        Some(_) => Some(turns(&v, "prompt", at)?).filter(|p| matches!(p, Turns::Messages(_)) == conversational),
        None => None,
    };
    Ok(match prompt {
        Some(prompt) => PreferenceExample { prompt, chosen, rejected },
        None => extract_prompt(chosen, rejected),
    })
}

/// TRL's `extract_prompt`: the prompt ends at the first element (character or message) where
/// chosen and rejected differ, moved back before a space that precedes it; when one is a prefix
/// of the other, at the shorter one's last element (Python's loop variable after the loop).
fn extract_prompt(chosen: Turns, rejected: Turns) -> PreferenceExample {
    fn split<T: PartialEq>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        let n = c.len().min(r.len());
        match (0..n).find(|&i| c[i] != r[i]) {
            Some(i) if i > 0 && is_space(&c[i - 1]) => i - 1,
            Some(i) => i,
            None => n.saturating_sub(1),
        }
    }
    match (chosen, rejected) {
        (Turns::Text(c), Turns::Text(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let at = split(&c, &r, |&ch| ch == ' ');
            let text = |s: &[char]| Turns::Text(s.iter().collect());
            PreferenceExample { prompt: text(&c[..at]), chosen: text(&c[at..]), rejected: text(&r[at..]) }
        }
        (Turns::Messages(c), Turns::Messages(r)) => {
            let at = split(&c, &r, |_| false);
            PreferenceExample { prompt: Turns::Messages(c[..at].to_vec()), chosen: Turns::Messages(c[at..].to_vec()), rejected: Turns::Messages(r[at..].to_vec()) }
        }
        _ => unreachable!("checked by the caller: both text or both messages"),
    }
}

/// Parses a preference JSONL file's text: each pair with its `file:line`. With
/// `skip_bad_lines`, bad lines are counted and skipped; otherwise the first is an error naming
/// `file:line`. Blank lines are ignored.
pub fn parse_preference_jsonl(text: &str, file: &str, skip_bad_lines: bool) -> Result<(Vec<(String, PreferenceExample)>, usize)> {
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{file}:{}", i + 1);
        match parse_preference_line(line, &at) {
            Ok(e) => examples.push((at, e)),
            Err(_) if skip_bad_lines => skipped += 1,
            Err(e) => return Err(e),
        }
    }
    if examples.is_empty() {
        return Err(Error::format(file, if skipped > 0 { format!("no usable pairs ({skipped} bad lines skipped)") } else { "empty dataset".to_string() }));
    }
    Ok((examples, skipped))
}

/// Tokenizes one pair. `eos` (the tokenizer's EOS text) is needed for text pairs, `template`
/// for conversational ones; `at` names the pair in errors.
pub fn encode_pair(example: &PreferenceExample, tok: &Tokenizer, template: Option<&ChatTemplate>, eos: Option<&str>, at: &str) -> Result<PairSample> {
    let (prompt, chosen, rejected) = match (&example.prompt, &example.chosen, &example.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => {
            let eos = eos.ok_or_else(|| Error::format(at, "text pairs need the tokenizer's EOS token, and the model has none"))?;
            let with_eos = |s: &str| if s.ends_with(eos) { s.to_string() } else { format!("{s}{eos}") };
            (tok.encode(p, true)?, tok.encode(&format!("{p}{}", with_eos(c)), true)?, tok.encode(&format!("{p}{}", with_eos(r)), true)?)
        }
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => {
            let template = template.ok_or_else(|| Error::format(at, "conversational pairs need a chat template, and the model has none"))?;
            let joined = |completion: &[Message]| -> Result<Vec<u32>> {
                let all: Vec<Message> = p.iter().chain(completion).cloned().collect();
                tok.encode(&template.render(&all, false)?.text, false)
            };
            (tok.encode(&template.render(p, true)?.text, false)?, joined(c)?, joined(r)?)
        }
        _ => return Err(Error::format(at, "a pair mixes text and messages")),
    };
    let split = common_prefix(&prompt, &chosen).min(common_prefix(&prompt, &rejected));
    Ok(PairSample { prompt_ids: prompt[..split].to_vec(), chosen_ids: chosen[split..].to_vec(), rejected_ids: rejected[split..].to_vec() })
}

/// Drops the pairs whose prompt alone reaches `max_len` (keep-start truncation would leave them
/// no completion token), as TRL does; returns how many were dropped.
pub fn drop_fully_truncated(pairs: &mut Vec<PairSample>, max_len: Option<usize>) -> usize {
    let before = pairs.len();
    if let Some(max) = max_len {
        pairs.retain(|p| p.prompt_ids.len() < max);
    }
    before - pairs.len()
}

/// Tokenizes one pair as TRL 1.16's ORPO trainer does: the chosen and the rejected sequence,
/// not yet truncated. `bos` and `eos` are the tokenizer's ids (EOS is required, as there).
pub fn encode_orpo_pair(example: &PreferenceExample, tok: &Tokenizer, template: Option<&ChatTemplate>, bos: Option<u32>, eos: Option<u32>, at: &str) -> Result<[Sequence; 2]> {
    let eos = eos.ok_or_else(|| Error::format(at, "ORPO needs the tokenizer's EOS token, and the model has none"))?;
    let (prompt, chosen, rejected) = match (&example.prompt, &example.chosen, &example.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => (p.clone(), c.clone(), r.clone()),
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => {
            let template = template.ok_or_else(|| Error::format(at, "conversational pairs need a chat template, and the model has none"))?;
            let full = |completion: &[Message]| -> Result<String> { Ok(template.render(&p.iter().chain(completion).cloned().collect::<Vec<_>>(), false)?.text) };
            let (full_c, full_r) = (full(c)?, full(r)?);
            // TRL's `apply_chat_template`: the prompt as far as both renderings agree with it.
            let rendered = template.render(p, true)?.text;
            let shared = |a: &str, b: &str| a.char_indices().zip(b.chars()).take_while(|((_, x), y)| x == y).last().map_or(0, |((i, x), _)| i + x.len_utf8());
            let end = shared(&rendered, &full_c).min(shared(&rendered, &full_r));
            let prompt = rendered[..end].to_string();
            (prompt, full_c[end..].to_string(), full_r[end..].to_string())
        }
        _ => return Err(Error::format(at, "a pair mixes text and messages")),
    };
    let prompt_ids = tok.encode(&prompt, false)?;
    // TRL's `build_tokenized_answer`: the boundary moves back one token when the last prompt
    // token merged with the completion's first.
    let answer = |completion: &str| -> Result<(Vec<u32>, Vec<u32>)> {
        let full = tok.encode(&format!("{prompt}{completion}"), false)?;
        let start = if full.starts_with(&prompt_ids) { prompt_ids.len() } else { prompt_ids.len().saturating_sub(1) }.min(full.len());
        let (mut p, mut c) = (full[..start].to_vec(), full[start..].to_vec());
        if let Some(bos) = bos.filter(|&b| p.first() != Some(&b)) {
            p.insert(0, bos);
        }
        if c.last() != Some(&eos) {
            c.push(eos);
        }
        Ok((p, c))
    };
    let ((pc, cc), (pr, cr)) = (answer(&chosen)?, answer(&rejected)?);
    Ok([Sequence::new(&pc, &cc), Sequence::new(&pr, &cr)])
}

/// ORPO's pairs: drops those where a sequence's prompt alone reaches `max_len` (TRL's ORPO would
/// train them with an empty completion, whose mean log-probability is 0/0) and cuts the rest to
/// `max_len`, keeping the start; returns how many were dropped.
pub fn truncate_orpo_pairs(pairs: &mut Vec<[Sequence; 2]>, max_len: Option<usize>) -> usize {
    let before = pairs.len();
    if let Some(max) = max_len {
        pairs.retain(|p| p.iter().all(|s| s.prompt_len() < max));
        pairs.iter_mut().flatten().for_each(|s| s.truncate(max));
    }
    before - pairs.len()
}
