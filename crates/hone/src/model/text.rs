//! A model's text side: its tokenizer, chat template, and the ids that end a reply, from a
//! Hugging Face directory or a GGUF file.

use crate::data::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
use crate::data::{ChatTemplate, Tokenizer};
use crate::error::{Error, Result};
use crate::io::gguf::Gguf;
use crate::io::FileSet;

pub struct ModelText {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

impl ModelText {
    /// From a Hugging Face directory: tokenizer.json, the template (tokenizer_config.json or
    /// chat_template.jinja), and EOS ids from config.json and generation_config.json.
    pub fn from_files(files: &dyn FileSet) -> Result<Self> {
        let config = super::load::read_config(files)?;
        let mut stops = config.eos_token_ids;
        if let Some(src) = files.open("generation_config.json")? {
            let v: serde_json::Value = serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(src.name(), e))?;
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => stops.extend(n.as_u64().map(|n| n as u32)),
                serde_json::Value::Array(a) => stops.extend(a.iter().filter_map(|n| n.as_u64().map(|n| n as u32))),
                _ => {}
            }
        }
        Ok(Self::finish(Tokenizer::open(files)?, ChatTemplate::open(files)?, stops))
    }

    /// From a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let config = super::gguf::config_from_gguf(g)?;
        Ok(Self::finish(tokenizer_from_gguf(g)?, chat_template_from_gguf(g)?, config.eos_token_ids))
    }

    /// The template's end-of-turn token and the usual end-of-turn tokens end a reply too.
    fn finish(tokenizer: Tokenizer, template: Option<ChatTemplate>, mut stop_ids: Vec<u32>) -> Self {
        if let Some(id) = template.as_ref().and_then(|t| t.eos_token.as_deref()).and_then(|e| tokenizer.token_to_id(e)) {
            stop_ids.push(id);
        }
        for end in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = tokenizer.token_to_id(end) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        ModelText { tokenizer, template, stop_ids }
    }
}
