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
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer { file: file.to_string(), message: e.to_string() })?;
        Ok(Tokenizer { inner, file: file.to_string() })
    }

    pub fn open(files: &dyn FileSet) -> Result<Self> {
        let src = files.open_required(TOKENIZER_FILE)?;
        Self::from_bytes(&src.read_all()?, src.name())
    }

    /// Token ids with the tokenizer's special tokens added (as `tokenizers`' `encode` does by
    /// default).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer { file: self.file.clone(), message: e.to_string() })
    }

    /// Ids and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { file: self.file.clone(), message: e.to_string() })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer { file: self.file.clone(), message: e.to_string() })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
