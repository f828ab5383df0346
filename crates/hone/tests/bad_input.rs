//! Bad model files each give an error naming the file and the tensor (or field) at fault.

mod common;

use burn::backend::NdArray;
use hone::io::MemFiles;
use serde_json::Value;
use std::fs;

fn llama_files() -> MemFiles {
    let dir = common::fixtures().join("llama");
    let mut files = MemFiles::new("llama");
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        files.insert(name, fs::read(dir.join(name)).unwrap());
    }
    files
}

fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn weights() -> Vec<u8> {
    fs::read(common::fixtures().join("llama/model.safetensors")).unwrap()
}

fn load_err(files: &MemFiles) -> String {
    let device = Default::default();
    match hone::model::load_model::<NdArray>(files, &device) {
        Ok(_) => panic!("bad input loaded without error"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let mut w = weights();
    w.truncate(w.len() - 100);
    let msg = load_err(&llama_files().with("model.safetensors", w));
    // The last tensor in the file (by offset) is the one cut short.
    assert_names(&msg, &["llama/model.safetensors", "model.norm.weight", "outside"]);
}

#[test]
fn truncated_header_names_file() {
    let w = weights()[..40].to_vec();
    let msg = load_err(&llama_files().with("model.safetensors", w));
    assert_names(&msg, &["llama/model.safetensors", "truncated"]);
}

#[test]
fn header_lying_about_offsets_names_tensor() {
    let (mut h, data) = split(&weights());
    let t = h.get_mut("model.layers.1.mlp.up_proj.weight").unwrap();
    let end = t["data_offsets"][1].as_u64().unwrap();
    t["data_offsets"][1] = (end - 4).into();
    let msg = load_err(&llama_files().with("model.safetensors", join(&h, &data)));
    assert_names(&msg, &["llama/model.safetensors", "model.layers.1.mlp.up_proj.weight", "needs"]);
}

#[test]
fn wrong_shape_for_config_names_tensor() {
    let mut cfg: Value = serde_json::from_slice(&fs::read(common::fixtures().join("llama/config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 96.into();
    let msg = load_err(&llama_files().with("config.json", serde_json::to_vec(&cfg).unwrap()));
    assert_names(&msg, &["llama/model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[128, 64]", "[96, 64]"]);
}

#[test]
fn missing_tensor_is_named() {
    let (mut h, data) = split(&weights());
    h.as_object_mut().unwrap().remove("model.layers.1.self_attn.k_proj.weight");
    let msg = load_err(&llama_files().with("model.safetensors", join(&h, &data)));
    assert_names(&msg, &["llama/model.safetensors", "model.layers.1.self_attn.k_proj.weight", "missing"]);
}

#[test]
fn unsupported_dtype_is_named() {
    let (mut h, data) = split(&weights());
    h["model.layers.0.self_attn.o_proj.weight"]["dtype"] = "F8_E4M3".into();
    let msg = load_err(&llama_files().with("model.safetensors", join(&h, &data)));
    assert_names(&msg, &["llama/model.safetensors", "model.layers.0.self_attn.o_proj.weight", "F8_E4M3"]);
}

#[test]
fn unknown_model_type_is_named() {
    let mut cfg: Value = serde_json::from_slice(&fs::read(common::fixtures().join("llama/config.json")).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    let msg = load_err(&llama_files().with("config.json", serde_json::to_vec(&cfg).unwrap()));
    assert_names(&msg, &["llama/config.json", "gpt2"]);
}

#[test]
fn missing_shard_is_named() {
    let dir = common::fixtures().join("qwen2");
    let mut files = MemFiles::new("qwen2");
    for name in ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"] {
        files.insert(name, fs::read(dir.join(name)).unwrap());
    }
    let msg = load_err(&files);
    assert_names(&msg, &["qwen2/model-00002-of-00002.safetensors", "not found"]);
}
