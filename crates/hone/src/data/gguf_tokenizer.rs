//! A tokenizer built from GGUF metadata, as transformers builds it: byte-level BPE ("gpt2")
//! from `tokenizer.ggml.tokens` and `.merges`, with control tokens as special added tokens and
//! the pre-tokenizer split that the vocabulary was trained with; the chat template from
//! `tokenizer.chat_template`.

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
    let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(Error::unsupported(g.name(), format!("tokenizer.ggml.model `{model}` (hone builds byte-level BPE, \"gpt2\", tokenizers from GGUF)")));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
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
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
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
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_bytes(&serde_json::to_vec(&json).expect("json"), g.name())
}

/// The chat template stored in the GGUF, with its BOS/EOS token texts.
pub fn chat_template_from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>> {
    let Some(src) = g.get("tokenizer.chat_template").and_then(Value::as_str) else { return Ok(None) };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let token = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|i| tokens.get(i as usize).cloned());
    ChatTemplate::new(src, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"), g.name()).map(Some)
}
