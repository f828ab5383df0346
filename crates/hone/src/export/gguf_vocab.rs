//! A Hugging Face tokenizer as the `tokenizer.*` metadata llama.cpp's `convert_hf_to_gguf.py`
//! writes, in its two forms:
//! - byte-level BPE from tokenizer.json (Llama 3, Qwen2, SmolLM2, GPT-2 style): the tokens in id
//!   order with their types, the merges, and the pre-tokenizer by llama.cpp's name, which hone
//!   reads from tokenizer.json's own description (the converter hashes the tokenization of a
//!   probe text instead; one hone cannot name is refused);
//! - SentencePiece from tokenizer.model (Llama 2, Mistral, Phi-3): pieces, scores and types read
//!   from the model file (a small protobuf reader), with the added tokens laid over them as the
//!   converter's Llama and Phi-3 classes each do;
//!
//! and for both the special token ids, whether BOS/EOS/SEP are added (`SpecialVocab`'s rules:
//! tokenizer.json's post-processor, tokenizer_config.json, config.json) and the chat template.

use crate::error::{Error, Result};
use crate::io::gguf::Value;
use crate::io::FileSet;
use crate::model::config::Arch;
use serde_json::Value as Json;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The Split regexes llama.cpp's pre-tokenizers were made from, as tokenizer.json spells them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special token kinds the converter looks for, in its order.
const SPECIAL: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

fn read_json(files: &dyn FileSet, name: &str) -> Result<Option<Json>> {
    match files.open(name)? {
        Some(src) => {
            let bytes = src.read_all()?;
            serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::format(format!("{}/{name}", files.location()), e))
        }
        None => Ok(None),
    }
}

/// llama.cpp's name for tokenizer.json's pre-tokenizer, when hone knows it.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    fn ty(v: &Json) -> &str {
        v.get("type").and_then(Json::as_str).unwrap_or("")
    }
    let byte_level = |v: &Json, regex: bool| ty(v) == "ByteLevel" && v.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex;
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre.get("pretokenizers").and_then(Json::as_array).filter(|_| ty(pre) == "Sequence")?;
    match parts.as_slice() {
        [d, b] if ty(d) == "Digits" && d.get("individual_digits").and_then(Json::as_bool) == Some(true) && byte_level(b, true) => Some("smollm"),
        [s, b] if ty(s) == "Split" && byte_level(b, false) => match s.pointer("/pattern/Regex").and_then(Json::as_str)? {
            LLAMA3_SPLIT => Some("llama-bpe"),
            QWEN2_SPLIT => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

/// The converter's test for added tokens that ought to be control tokens.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The `tokenizer.*` metadata for the tokenizer files in `files`, for a model of `arch` whose
/// config.json says `vocab_size`.
pub fn vocab_metadata(files: &dyn FileSet, arch: Arch, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tok = read_json(files, "tokenizer.json")?;
    let tok_config = read_json(files, "tokenizer_config.json")?;
    let config = read_json(files, "config.json")?.unwrap_or(Json::Null);
    let gpt2_class = tok_config.as_ref().and_then(|c| c.get("tokenizer_class")).and_then(Json::as_str) == Some("GPT2Tokenizer");
    let spm = match files.open("tokenizer.model")? {
        Some(src) if arch != Arch::Qwen2 && !(arch == Arch::Phi3 && gpt2_class) => Some(src.read_all()?),
        _ => None,
    };
    let mut out = match spm {
        Some(model) => sentencepiece(files, arch, &model, tok.as_ref(), tok_config.as_ref(), vocab_size)?,
        None => {
            let tok = tok.as_ref().ok_or_else(|| Error::io(format!("{}/tokenizer.json", files.location()), "not found (a GGUF needs the tokenizer)"))?;
            byte_level_bpe(files, tok, vocab_size)?
        }
    };
    let n_vocab = match out.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        Some((_, Value::Array(t))) => t.len(),
        _ => vocab_size,
    };
    let added: Vec<&Json> = tok.as_ref().and_then(|t| t.get("added_tokens")).and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    let (ids, add) = special_tokens(tok.as_ref(), tok_config.as_ref(), &config, &added, n_vocab);
    // The converter's writer has keys for these (spelled as llama.cpp spells them); others are
    // dropped with a warning there, and here.
    let key = |typ: &'static str| match typ {
        "unk" => Some("unknown"),
        "sep" => Some("seperator"),
        "pad" => Some("padding"),
        "bos" | "eos" | "mask" | "eot" | "eom" => Some(typ),
        _ => None,
    };
    out.extend(ids.into_iter().filter_map(|(typ, id)| Some((format!("tokenizer.ggml.{}_token_id", key(typ)?), Value::U32(id)))));
    out.extend(add.into_iter().filter(|(typ, _)| matches!(*typ, "bos" | "eos" | "sep")).map(|(typ, on)| (format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(on))));
    if let Some(t) = chat_template(files, tok_config.as_ref())? {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    // The converter's Llama class (Mistral's too) also passes on add_prefix_space.
    if matches!(arch, Arch::Llama | Arch::Mistral) {
        if let Some(on) = tok_config.as_ref().and_then(|c| c.get("add_prefix_space")).and_then(Json::as_bool) {
            out.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(on)));
        }
    }
    Ok(out)
}

/// Byte-level BPE ("gpt2") from tokenizer.json.
fn byte_level_bpe(files: &dyn FileSet, tok: &Json, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let here = |name: &str| format!("{}/{name}", files.location());
    let model = tok.get("model").ok_or_else(|| Error::format(here("tokenizer.json"), "no `model`"))?;
    let refuse = |why: String| Error::unsupported(here("tokenizer.json"), format!("{why}; merge with --out and convert the directory with llama.cpp's convert_hf_to_gguf.py"));
    if model.get("type").and_then(Json::as_str) != Some("BPE") || model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(refuse("a SentencePiece-style vocabulary without its tokenizer.model (llama.cpp's converter reads that file for it, and so does hone)".into()));
    }
    let pre = tok.get("pre_tokenizer").and_then(pre_tokenizer_name).ok_or_else(|| refuse("a pre-tokenizer hone cannot name for llama.cpp (it knows GPT-2's, SmolLM's, Llama 3's and Qwen2's)".into()))?;

    // Tokens in id order: the vocabulary, then the added tokens over it.
    let vocab = model.get("vocab").and_then(Json::as_object).ok_or_else(|| Error::format(here("tokenizer.json"), "no `model.vocab`"))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let slot = |id: Option<u64>, t: &str| -> Result<usize> {
        let id = id.ok_or_else(|| Error::format(here("tokenizer.json"), format!("token {t:?} has no id")))? as usize;
        if id >= vocab_size {
            return Err(Error::format(here("tokenizer.json"), format!("token {t:?} has id {id}, past config.json's vocab_size {vocab_size}")));
        }
        Ok(id)
    };
    for (t, id) in vocab {
        tokens[slot(id.as_u64(), t)?] = Some((t.clone(), NORMAL));
    }
    let added: Vec<&Json> = tok.get("added_tokens").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    for a in added {
        let t = a.get("content").and_then(Json::as_str).unwrap_or_default();
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        let entry = if special || looks_special(t) { (t.to_string(), CONTROL) } else { (t.replace('\u{2581}', " "), USER_DEFINED) };
        tokens[slot(a.get("id").and_then(Json::as_u64), t)?] = Some(entry);
    }
    let (names, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or((format!("[PAD{i}]"), UNUSED)))
        .map(|(t, ty)| (Value::String(t), Value::I32(ty)))
        .unzip();

    // Merges: "a b" strings, or pairs (spaces inside a part shifted past the byte alphabet).
    let merges: Vec<Value> = match model.get("merges").and_then(Json::as_array) {
        Some(m) => m
            .iter()
            .map(|e| match e {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => Ok(p
                    .iter()
                    .map(|s| s.as_str().unwrap_or_default().chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(" ")),
                _ => Err(Error::format(here("tokenizer.json"), "a merge that is neither \"a b\" nor [a, b]")),
            })
            .map(|m| m.map(Value::String))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };

    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(names)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ];
    if !merges.is_empty() {
        out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    }
    Ok(out)
}

/// SentencePiece ("llama") from tokenizer.model, with the added tokens over it.
fn sentencepiece(files: &dyn FileSet, arch: Arch, model: &[u8], tok: Option<&Json>, tok_config: Option<&Json>, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let here = |name: &str| format!("{}/{name}", files.location());
    let pieces = sentencepiece_pieces(model).map_err(|m| Error::format(here("tokenizer.model"), m))?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (i, (piece, score, ty)) in pieces.into_iter().enumerate().take(vocab_size) {
        tokens[i] = piece;
        scores[i] = score;
        // The converter asks is-unknown / control / unused / byte; anything else is normal.
        types[i] = if matches!(ty, 2 | 3 | 5 | 6) { ty } else { NORMAL };
    }
    let mut set = |id: usize, text: String, ty: i32| {
        if id < vocab_size {
            tokens[id] = text;
            scores[id] = -1000.0;
            types[id] = ty;
        }
    };
    if let Some(added) = read_json(files, "added_tokens.json")?.as_ref().and_then(Json::as_object) {
        for (text, id) in added {
            set(id.as_u64().unwrap_or(u64::MAX) as usize, text.clone(), USER_DEFINED);
        }
    }
    let decoder = tok_config.and_then(|c| c.get("added_tokens_decoder")).and_then(Json::as_object);
    let entries: Vec<(usize, &Json)> = decoder.into_iter().flatten().filter_map(|(id, d)| Some((id.parse().ok()?, d))).collect();
    let content = |d: &Json| d.get("content").and_then(Json::as_str).unwrap_or_default().to_string();
    let special = |d: &Json| d.get("special").and_then(Json::as_bool).unwrap_or(false);
    if arch == Arch::Phi3 {
        // Phi-3's class: the config's added tokens, then tokenizer.json's, each user-defined or,
        // when marked special, control.
        let from_json: Vec<(usize, &Json)> = tok.and_then(|t| t.get("added_tokens")).and_then(Json::as_array).into_iter().flatten().filter_map(|d| Some((d.get("id")?.as_u64()? as usize, d))).collect();
        for (id, d) in entries.into_iter().chain(from_json) {
            set(id, content(d), if special(d) { CONTROL } else { USER_DEFINED });
        }
    } else {
        for (id, d) in entries {
            let text = content(d);
            if special(d) || looks_special(&text) {
                set(id, text, CONTROL);
            } else {
                set(id, text.replace('\u{2581}', " "), USER_DEFINED);
            }
        }
    }
    Ok(vec![
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
    ])
}

/// The pieces of a SentencePiece model file (`ModelProto.pieces`: piece, score, type; type 1,
/// normal, when absent), read with the few protobuf rules they need.
fn sentencepiece_pieces(bytes: &[u8]) -> std::result::Result<Vec<(String, f32, i32)>, String> {
    fn varint(b: &[u8], at: &mut usize) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at).ok_or("the file ends inside a number")?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a number longer than 10 bytes".into())
    }
    /// (field, wire type, the field's bytes) of each field of a message.
    fn fields(b: &[u8]) -> std::result::Result<Vec<(u64, u64, &[u8])>, String> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let tag = varint(b, &mut at)?;
            let start = at;
            let len = match tag & 7 {
                0 => {
                    varint(b, &mut at)?;
                    0
                }
                1 => 8,
                2 => varint(b, &mut at)? as usize,
                5 => 4,
                w => return Err(format!("protobuf wire type {w} (not a SentencePiece model?)")),
            };
            let begin = if tag & 7 == 0 { start } else { at };
            let end = if tag & 7 == 0 { at } else { at.checked_add(len).filter(|&e| e <= b.len()).ok_or("a field runs past the end of the file")? };
            out.push((tag >> 3, tag & 7, &b[begin..end]));
            at = end;
        }
        Ok(out)
    }
    let mut pieces = Vec::new();
    for (field, wire, body) in fields(bytes)? {
        if field != 1 || wire != 2 {
            continue;
        }
        let (mut piece, mut score, mut ty) = (None, 0f32, 1i32);
        for (f, w, v) in fields(body)? {
            match (f, w) {
                (1, 2) => piece = Some(String::from_utf8(v.to_vec()).map_err(|_| "a piece that is not UTF-8")?),
                (2, 5) => score = f32::from_le_bytes(v.try_into().expect("4 bytes")),
                (3, 0) => ty = varint(v, &mut 0)? as i32,
                _ => {}
            }
        }
        pieces.push((piece.ok_or("a piece without its text")?, score, ty));
    }
    if pieces.is_empty() {
        return Err("no pieces (not a SentencePiece model?)".into());
    }
    Ok(pieces)
}

/// The chat template: tokenizer_config.json's, else chat_template.jinja or chat_template.json.
fn chat_template(files: &dyn FileSet, tok_config: Option<&Json>) -> Result<Option<String>> {
    let Some(cfg) = tok_config else { return Ok(None) };
    if let Some(t) = cfg.get("chat_template") {
        return match t {
            Json::String(s) => Ok(Some(s.clone())),
            Json::Null => Ok(None),
            _ => Err(Error::unsupported(format!("{}/tokenizer_config.json", files.location()), "named chat templates (a list); hone writes one template")),
        };
    }
    if let Some(src) = files.open("chat_template.jinja")? {
        return Ok(Some(String::from_utf8_lossy(&src.read_all()?).into_owned()));
    }
    Ok(read_json(files, "chat_template.json")?.and_then(|j| j.get("chat_template").and_then(Json::as_str).map(str::to_string)))
}

/// Special token ids and add-BOS/EOS/SEP flags as the converter's `SpecialVocab` finds them:
/// the post-processor of tokenizer.json, then tokenizer_config.json, then config.json's ids.
/// Kept in the order found (insertion order, as the converter writes them).
#[allow(clippy::type_complexity)]
fn special_tokens(tok: Option<&Json>, tok_config: Option<&Json>, config: &Json, added: &[&Json], n_vocab: usize) -> (Vec<(&'static str, u32)>, Vec<(&'static str, bool)>) {
    let mut cfg: serde_json::Map<String, Json> = tok_config.and_then(Json::as_object).cloned().unwrap_or_default();
    let has_cfg = tok_config.is_some_and(|c| c.as_object().is_some_and(|o| !o.is_empty()));
    let mut add: Vec<(&'static str, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(&'static str, bool)>, typ: &'static str, on: bool, overwrite: bool| match add.iter_mut().find(|(t, _)| *t == typ) {
        Some(e) if overwrite => e.1 = on,
        Some(_) => {}
        None => add.push((typ, on)),
    };
    let content = |v: Option<&Json>| -> Option<String> {
        match v? {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        }
    };
    let mut types: Vec<&'static str> = SPECIAL.to_vec();
    let mut bos = content(cfg.get("bos_token"));
    let mut cls = content(cfg.get("cls_token"));
    let mut eos = content(cfg.get("eos_token"));
    let sep = content(cfg.get("sep_token"));
    if bos.is_none() && has_cfg && tok.is_some() {
        if let Some(c) = &cls {
            cfg.insert("bos_token".into(), Json::String(c.clone()));
            bos = Some(c.clone());
        }
    }
    if eos.is_none() && has_cfg && tok.is_some() {
        if let Some(s) = &sep {
            cfg.insert("eos_token".into(), Json::String(s.clone()));
            eos = Some(s.clone());
        }
    }
    if let Some(post) = tok.and_then(|t| t.get("post_processor")).filter(|p| !p.is_null()) {
        let list: Vec<&Json> = match post.get("processors").and_then(Json::as_array) {
            Some(ps) => ps.iter().collect(),
            None => vec![post],
        };
        for p in list {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    set_add(&mut add, "bos", false, false);
                    set_add(&mut add, "eos", false, false);
                }
                Some("RobertaProcessing") => {
                    for t in ["bos", "eos", "sep"] {
                        set_add(&mut add, t, true, true);
                    }
                }
                Some("TemplateProcessing") => {
                    let special_id = |e: Option<&Json>| e.and_then(|e| e.pointer("/SpecialToken/id")).and_then(Json::as_str).map(str::to_string);
                    let single = p.get("single").and_then(Json::as_array).cloned().unwrap_or_default();
                    let pair = p.get("pair").and_then(Json::as_array).cloned().unwrap_or_default();
                    let mut first = None;
                    let mut last = None;
                    if single.len() > 1 {
                        first = special_id(single.first());
                        if let Some(f) = &first {
                            if !has_cfg {
                                bos = Some(f.clone());
                            } else if Some(f) != bos.as_ref() && Some(f) != cls.as_ref() {
                                if bos.is_none() {
                                    cfg.insert("bos_token".into(), Json::String(f.clone()));
                                    bos = Some(f.clone());
                                }
                                if cls.is_none() {
                                    cfg.insert("cls_token".into(), Json::String(f.clone()));
                                    cls = Some(f.clone());
                                }
                            }
                            let on = Some(f) == bos.as_ref() || Some(f) == cls.as_ref();
                            set_add(&mut add, "bos", on, true);
                        }
                        last = special_id(single.last());
                        if let Some(l) = &last {
                            if !has_cfg {
                                eos = Some(l.clone());
                            } else if Some(l) != eos.as_ref() {
                                if !types.contains(&"eot") {
                                    types.push("eot");
                                    if let Some(e) = &eos {
                                        cfg.insert("eot_token".into(), Json::String(e.clone()));
                                    }
                                } else if !types.contains(&"eom") {
                                    types.push("eom");
                                    if let Some(e) = &eos {
                                        cfg.insert("eom_token".into(), Json::String(e.clone()));
                                    }
                                }
                                cfg.insert("eos_token".into(), Json::String(l.clone()));
                                eos = Some(l.clone());
                            }
                            set_add(&mut add, "eos", Some(l) == eos.as_ref(), true);
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && special_id(pair.first()) == first);
                        let stop = if last.is_some() && special_id(pair.last()) == last { pair.len() - 1 } else { pair.len() };
                        let inner = pair.get(start..stop.max(start)).unwrap_or_default();
                        let seq = |e: Option<&Json>| e.and_then(|e| e.pointer("/Sequence/id")).and_then(Json::as_str).map(str::to_string);
                        if seq(inner.first()).as_deref() == Some("A") && seq(inner.last()).as_deref() == Some("B") && inner.len() > 2 {
                            let middle = &inner[1..inner.len() - 1];
                            let is_sep = |e: Option<&Json>| special_id(e).is_some_and(|s| Some(&s) == sep.as_ref() || Some(&s) == eos.as_ref());
                            let mut add_sep = false;
                            if special_id(middle.first()).is_some() && is_sep(middle.first()) && last.is_none() {
                                add_sep = true;
                            }
                            if middle.len() == 2 && special_id(middle.get(1)).is_some() && is_sep(middle.get(1)) {
                                add_sep = true;
                            }
                            set_add(&mut add, "sep", add_sep, true);
                            if add_sep && sep.is_none() && has_cfg {
                                if let Some(e) = &eos {
                                    cfg.insert("sep_token".into(), Json::String(e.clone()));
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut ids: Vec<(&'static str, u32)> = Vec::new();
    let set_id = |ids: &mut Vec<(&'static str, u32)>, typ: &'static str, id: Option<u64>| {
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            if !ids.iter().any(|(t, _)| *t == typ) {
                ids.push((typ, id as u32));
            }
        }
    };
    if has_cfg {
        for &typ in &types {
            if let Some(on) = cfg.get(&format!("add_{typ}_token")).and_then(Json::as_bool) {
                set_add(&mut add, typ, on, false);
            }
            let Some(text) = content(cfg.get(&format!("{typ}_token"))) else { continue };
            let id = added.iter().find(|a| a.get("content").and_then(Json::as_str) == Some(text.as_str())).and_then(|a| a.get("id")).and_then(Json::as_u64);
            set_id(&mut ids, typ, id);
        }
    }
    for &typ in &types {
        let id = config.get(format!("{typ}_token_id")).or_else(|| config.pointer(&format!("/text_config/{typ}_token_id"))).and_then(Json::as_u64);
        set_id(&mut ids, typ, id);
    }
    (ids, add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        let bl = |r: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": r});
        let split = |p: &str| serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}, bl(false)]});
        assert_eq!(pre_tokenizer_name(&bl(true)), Some("gpt-2"));
        assert_eq!(pre_tokenizer_name(&split(LLAMA3_SPLIT)), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&split(QWEN2_SPLIT)), Some("qwen2"));
        assert_eq!(pre_tokenizer_name(&serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, bl(true)]})), Some("smollm"));
        assert_eq!(pre_tokenizer_name(&split(r"\p{N}+")), None);
        assert_eq!(pre_tokenizer_name(&bl(false)), None);
    }
}
