//! A Hugging Face tokenizer as GGUF metadata (`hone merge --gguf` from a Hugging Face base): the
//! input as tokenizer.model (SentencePiece protobuf) under llama and phi3, and as
//! tokenizer_config.json beside a byte-level BPE tokenizer.json.
#![no_main]
use hone::export::gguf_vocab::vocab_metadata;
use hone::io::MemFiles;
use hone::model::config::Arch;

const CONFIG: &[u8] = br#"{"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2}"#;
const TOKENIZER: &[u8] = br#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": true}, "added_tokens": [{"id": 3, "content": "<|end|>", "special": true}], "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|end|>"}}, {"Sequence": {"id": "A"}}], "pair": [{"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "<|end|>"}}, {"Sequence": {"id": "B"}}]}}"#;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for arch in [Arch::Llama, Arch::Phi3] {
        let mut files = MemFiles::new("model");
        files.insert("config.json", CONFIG.to_vec());
        files.insert("tokenizer.model", data.to_vec());
        let _ = vocab_metadata(&files, arch, 64);
    }
    let mut files = MemFiles::new("model");
    files.insert("config.json", CONFIG.to_vec());
    files.insert("tokenizer.json", TOKENIZER.to_vec());
    files.insert("tokenizer_config.json", data.to_vec());
    let _ = vocab_metadata(&files, Arch::Qwen2, 64);
});
