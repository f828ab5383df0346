//! A tokenizer built from GGUF metadata, as transformers builds it: byte-level BPE ("gpt2")
//! from `tokenizer.ggml.tokens` and `.merges`, with control tokens as special added tokens and
//! the pre-tokenizer split that the vocabulary was trained with; SentencePiece BPE ("llama")
//! from the tokens and their scores; the chat template from `tokenizer.chat_template`.

use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::io::gguf::{Gguf, Value};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| Error::format(g.name(), format!("no `{key}`")))?
        .iter()
        .map(|v| v.as_str().map(String::from).ok_or_else(|| Error::format(g.name(), format!("`{key}` holds a non-string"))))
        .collect()
}

/// GPT-2's byte → printable character map.
fn byte_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).expect("valid");
    }
    map
}

pub fn tokenizer_from_gguf(g: &Gguf) -> Result<Tokenizer> {
    match g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("") {
        "gpt2" => byte_level_bpe(g),
        "llama" => sentencepiece_bpe(g),
        other => Err(Error::unsupported(g.name(), format!("tokenizer.ggml.model `{other}` (hone builds \"gpt2\" and \"llama\" tokenizers from GGUF)"))),
    }
}

fn token_types(g: &Gguf) -> Vec<u64> {
    g.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

fn flag(g: &Gguf, key: &str) -> Option<bool> {
    match g.get(key)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

/// The merges a SentencePiece vocabulary implies, as transformers recovers them when a GGUF
/// has none: every split of a token into two tokens, ordered by the token's score (best
/// first), then longer left and right pieces first; ties in vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<String> {
    let index: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).rev().collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .map(|(at, _)| (&t[..at], &t[at..], score))
            .filter(|(l, r, _)| index.contains_key(l) && index.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r, _)| (index[l], index[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(chars(b.0).cmp(&chars(a.0))).then(chars(b.1).cmp(&chars(a.1))));
    merges.into_iter().map(|(l, r, _)| format!("{l} {r}")).collect()
}

/// SentencePiece BPE ("llama": Llama 2, Mistral, …) as transformers' LlamaTokenizer builds it:
/// BPE with byte fallback over the pieces as spelled, "▁" for spaces with one prepended at the
/// start, BOS added (unless the file says not to), control tokens special.
fn sentencepiece_bpe(g: &Gguf) -> Result<Tokenizer> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = g
        .get("tokenizer.ggml.scores")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).map(|v| v as f32).collect())
        .ok_or_else(|| Error::format(g.name(), "no `tokenizer.ggml.scores` (a SentencePiece vocabulary needs them)"))?;
    if scores.len() != tokens.len() {
        return Err(Error::format(g.name(), format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let merges = match g.get("tokenizer.ggml.merges") {
        Some(_) => strings(g, "tokenizer.ggml.merges")?,
        None => merges_from_scores(&tokens, &scores),
    };
    let types = token_types(g);
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i.into());
    }
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match types.get(i).copied() {
            Some(3) => Some(added_token(i, t, true)),
            Some(4) => Some(added_token(i, t, false)),
            _ => None,
        })
        .collect();
    let special = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|i| tokens.get(i as usize).map(|t| (t.clone(), i)));
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut mark = |tok: Option<(String, u64)>, single: &mut Vec<serde_json::Value>| {
        if let Some((t, id)) = tok {
            single.push(serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}}));
            specials.insert(t.clone(), serde_json::json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    };
    if flag(g, "tokenizer.ggml.add_bos_token").unwrap_or(true) {
        mark(special("tokenizer.ggml.bos_token_id"), &mut single);
    }
    single.push(serde_json::json!({"Sequence": {"id": "A", "type_id": 0}}));
    if flag(g, "tokenizer.ggml.add_eos_token").unwrap_or(false) {
        mark(special("tokenizer.ggml.eos_token_id"), &mut single);
    }
    let json = tokenizer_json(
        added,
        serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
        serde_json::json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials}),
        serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]}),
        bpe(vocab, merges, true),
    );
    Tokenizer::from_bytes(&serde_json::to_vec(&json).expect("json"), g.name())
}

/// Byte-level BPE ("gpt2": Llama 3, Qwen2, SmolLM2, …) from the vocabulary and merges.
fn byte_level_bpe(g: &Gguf) -> Result<Tokenizer> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types = token_types(g);
    let alphabet = byte_alphabet();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = if spelled(t) { t.clone() } else { t.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(key, i.into());
    }
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| types.get(*i).copied() == Some(3) && spelled(t))
        .map(|(i, t)| added_token(i, t, true))
        .collect();
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let byte_level = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let pre_tokenizer = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]}),
        "default" | "gpt2" | "smollm" | "gpt-2" => byte_level(true),
        other => return Err(Error::unsupported(g.name(), format!("tokenizer.ggml.pre `{other}`"))),
    };
    let json = tokenizer_json(
        added,
        pre_tokenizer,
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        bpe(vocab, merges, false),
    );
    Tokenizer::from_bytes(&serde_json::to_vec(&json).expect("json"), g.name())
}

/// A token matched whole in the text before the model sees it.
fn added_token(id: usize, content: &str, special: bool) -> serde_json::Value {
    serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special})
}

/// A tokenizer.json document from its parts (no normalizer, truncation or padding).
fn tokenizer_json(added: Vec<serde_json::Value>, pre: serde_json::Value, post: serde_json::Value, decoder: serde_json::Value, model: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": decoder,
        "model": model,
    })
}

/// A BPE model; SentencePiece vocabularies fall back to byte tokens (and fuse unknowns).
fn bpe(vocab: serde_json::Map<String, serde_json::Value>, merges: Vec<String>, byte_fallback: bool) -> serde_json::Value {
    serde_json::json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                       "fuse_unk": byte_fallback, "byte_fallback": byte_fallback, "ignore_merges": false, "vocab": vocab, "merges": merges})
}

/// The chat template stored in the GGUF, with its BOS/EOS token texts.
pub fn chat_template_from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>> {
    let Some(src) = g.get("tokenizer.chat_template").and_then(Value::as_str) else { return Ok(None) };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let token = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|i| tokens.get(i as usize).cloned());
    ChatTemplate::new(src, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"), g.name()).map(Some)
}
