//! SmolLM2-135M-Instruct from its GGUF (`cargo xtask default-model` fetches and caches it):
//! the tokenizer built from GGUF metadata equals transformers'; the chat template renders as
//! transformers renders it; greedy decoding gives transformers' 30 tokens.
//! Fixture: tests/reference/make_smollm2_fixtures.py.

mod common;

use hone::data::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
use hone::data::Message;
use hone::io::gguf::Gguf;
use hone::io::FileSource;
use std::path::PathBuf;

/// The default model, as `cargo xtask default-model` leaves it. Missing means set-up was
/// skipped: `cargo xtask test` runs it first.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("HONE_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        home.join(".cache/hone/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "{} is missing: run `cargo xtask default-model` (cargo xtask test does)", path.display());
    path
}

fn fixture() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(common::fixtures().join("smollm2_gguf.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_from_gguf_equals_transformers() {
    let g = Gguf::open(Box::new(FileSource::open(&smollm2_gguf()).unwrap())).unwrap();
    let tok = tokenizer_from_gguf(&g).unwrap();
    let f = fixture();
    for case in f["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{text:?}");
    }
    let template = chat_template_from_gguf(&g).unwrap().unwrap();
    let prompt = template.render(&[Message { role: "user".into(), content: f["question"].as_str().unwrap().into() }], true).unwrap().text;
    assert_eq!(prompt, f["prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, false).unwrap(), ids(&f["prompt_ids"]));
}

#[test]
fn greedy_generation_equals_transformers() {
    use burn::backend::NdArray;
    use hone::generate::{generate, GenerateConfig};
    use hone::model::gguf::load_gguf;
    let g = Gguf::open(Box::new(FileSource::open(&smollm2_gguf()).unwrap())).unwrap();
    let device = Default::default();
    let (model, _, _) = load_gguf::<NdArray>(&g, Default::default(), &device).unwrap();
    let f = fixture();
    let out = generate(&model, &ids(&f["prompt_ids"]), &GenerateConfig { max_new_tokens: 30, ..Default::default() });
    assert_eq!(out, ids(&f["greedy_ids"]));
}
