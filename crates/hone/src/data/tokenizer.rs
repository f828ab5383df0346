//! `tokenizer.json` through the `tokenizers` crate (onig regexes natively, fancy-regex in wasm).

use crate::error::{Error, Result};
use crate::io::FileSet;

pub const TOKENIZER_FILE: &str = "tokenizer.json";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    file: String,
}

impl Tokenizer {
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let err = |message: String| Error::Tokenizer { file: file.to_string(), message };
        // tokenizers 0.22 panics (`expect("Helper")`) on a syntax error inside the decoder
        // section: the JSON is checked first, and what still panics is caught where unwinding
        // exists (natively).
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| err("the tokenizers crate panicked reading it (malformed content)".to_string()))?
            .map_err(|e| err(e.to_string()))?;
        // tokenizers validates a template post-processor only when it is built in code, not when
        // it is read: one that names a special token the file does not define panics at the first
        // encode, which wasm cannot catch. Checked here, on every target.
        if let Some(post) = inner.get_post_processor() {
            let post = serde_json::to_value(post).map_err(|e| err(e.to_string()))?;
            check_post_processor(&post).map_err(|m| err(format!("post_processor: {m}")))?;
        }
        let tok = Tokenizer { inner, file: file.to_string() };
        // Anything else that deserializes but cannot work panics at the first encode: found now,
        // named by file (natively).
        for special in [true, false] {
            tok.encode("Hello, world.", special)?;
        }
        Ok(tok)
    }

    /// `f` on the inner tokenizer, a panic inside the tokenizers crate made an error naming the
    /// file (natively; wasm aborts on panics).
    fn guarded<T>(&self, what: &str, f: impl FnOnce(&tokenizers::Tokenizer) -> tokenizers::Result<T>) -> Result<T> {
        let err = |message: String| Error::Tokenizer { file: self.file.clone(), message };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.inner)))
            .map_err(|_| err(format!("the tokenizers crate panicked while {what} (malformed tokenizer.json)")))?
            .map_err(|e| err(e.to_string()))
    }

    pub fn open(files: &dyn FileSet) -> Result<Self> {
        let src = files.open_required(TOKENIZER_FILE)?;
        Self::from_bytes(&src.read_all()?, src.name())
    }

    /// Token ids with the tokenizer's special tokens added (as `tokenizers`' `encode` does by
    /// default).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.guarded("encoding", |t| t.encode(text, add_special_tokens)).map(|e| e.get_ids().to_vec())
    }

    /// Ids and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.guarded("encoding", |t| t.encode(text, add_special_tokens))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.guarded("decoding", |t| t.decode(ids, skip_special_tokens))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Every special token a `TemplateProcessing` (also inside a `Sequence`) places is defined in its
/// `special_tokens`, with as many ids as tokens — what tokenizers' builder checks and its reader
/// does not.
fn check_post_processor(post: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    match post.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            post.get("processors").and_then(Value::as_array).into_iter().flatten().try_for_each(check_post_processor)
        }
        Some("TemplateProcessing") => {
            let defined = post.get("special_tokens").and_then(Value::as_object);
            for (name, token) in defined.into_iter().flatten() {
                let len = |k: &str| token.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                if len("ids") != len("tokens") {
                    return Err(format!("special token {name:?} has {} ids but {} tokens", len("ids"), len("tokens")));
                }
            }
            for template in ["single", "pair"] {
                let pieces = post.get(template).and_then(Value::as_array).into_iter().flatten();
                for id in pieces.filter_map(|p| p.get("SpecialToken")?.get("id")?.as_str()) {
                    if !defined.is_some_and(|d| d.contains_key(id)) {
                        return Err(format!("the {template} template places special token {id:?}, which special_tokens does not define"));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
