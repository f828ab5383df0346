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

/// A config with fewer layers than the weights hold: refused by the last layer's tensor before
/// anything is read, not trained on a cut model.
#[test]
fn weights_of_more_layers_than_the_config_are_refused_by_name() {
    let mut cfg: Value = serde_json::from_slice(&fs::read(common::fixtures().join("llama/config.json")).unwrap()).unwrap();
    let n = cfg["num_hidden_layers"].as_u64().unwrap();
    cfg["num_hidden_layers"] = (n - 1).into();
    let msg = load_err(&llama_files().with("config.json", serde_json::to_vec(&cfg).unwrap()));
    let last = format!("model.layers.{}.input_layernorm.weight", n - 1);
    assert_names(&msg, &["llama/model.safetensors", &last, &format!("has {} layers", n - 1), "does not match"]);

    // A GGUF file: its tensor table against the block count the model is built with.
    let mut bytes = Vec::new();
    hone::export::gguf_hf::hf_to_gguf(&llama_files(), None, hone::export::gguf_merge::MergedType::F32, "tiny", &mut |b| {
        bytes.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    let g = hone::io::gguf::Gguf::open(Box::new(hone::io::MemSource::new("tiny.gguf", bytes))).unwrap();
    let mut config = hone::model::gguf::config_from_gguf(&g).unwrap();
    let n = config.num_hidden_layers;
    config.num_hidden_layers = n - 1;
    let source = hone::model::gguf::GgufWeights { gguf: &g, config: &config };
    let msg = match hone::model::load::build::<NdArray>(config.clone(), &source, Default::default(), &Default::default()) {
        Ok(_) => panic!("a GGUF with more blocks than its config loaded"),
        Err(e) => e.to_string(),
    };
    assert_names(&msg, &["tiny.gguf", &format!("blk.{}.", n - 1), &format!("has {} layers", n - 1)]);
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

// Sizes from untrusted headers: each refused by name before any allocation of that size.

#[test]
fn header_claiming_a_terabyte_tensor_is_refused_by_name() {
    use hone::io::safetensors::SafeTensors;
    use hone::io::MemSource;
    let started = std::time::Instant::now();
    // 2^18 × 2^20 f32 = 1 TiB, in offsets that fit u64, in a file of a few hundred bytes.
    let tb = serde_json::json!({"huge": {"dtype": "F32", "shape": [1u64 << 18, 1u64 << 20], "data_offsets": [0u64, 1u64 << 40]}});
    let err = SafeTensors::open(Box::new(MemSource::new("tb.safetensors", join(&tb, &[0; 64])))).err().expect("refused").to_string();
    assert_names(&err, &["tb.safetensors", "huge", "outside"]);
    // A shape whose element count overflows 64 bits, with offsets that pretend it is small.
    let wrap = serde_json::json!({"wraps": {"dtype": "F32", "shape": [1u64 << 32, 1u64 << 32, 4], "data_offsets": [0, 0]}});
    let err = SafeTensors::open(Box::new(MemSource::new("wrap.safetensors", join(&wrap, &[])))).err().expect("refused").to_string();
    assert_names(&err, &["wrap.safetensors", "wraps", "too large"]);
    assert!(started.elapsed().as_secs() < 5);
}

/// A GGUF v3 file: magic, version, counts, then `body` (metadata and tensor infos), then `data`.
fn gguf(n_tensors: u64, n_kv: u64, body: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&n_tensors.to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    out.extend_from_slice(body);
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    out
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn gguf_err(bytes: Vec<u8>) -> String {
    use hone::io::gguf::Gguf;
    use hone::io::MemSource;
    match Gguf::open(Box::new(MemSource::new("bad.gguf", bytes))) {
        Ok(_) => panic!("a lying GGUF header was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn gguf_array_of_2_pow_40_strings_is_refused() {
    let started = std::time::Instant::now();
    let mut kv = gguf_string("tokenizer.ggml.tokens");
    kv.extend_from_slice(&9u32.to_le_bytes()); // array
    kv.extend_from_slice(&8u32.to_le_bytes()); // of strings
    kv.extend_from_slice(&(1u64 << 40).to_le_bytes());
    kv.extend_from_slice(&gguf_string("a"));
    let err = gguf_err(gguf(0, 1, &kv, &[]));
    assert_names(&err, &["bad.gguf", "array of 1099511627776 items"]);
    // A string said to be 2^40 bytes long.
    let mut kv = gguf_string("general.name");
    kv.extend_from_slice(&8u32.to_le_bytes());
    kv.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert_names(&gguf_err(gguf(0, 1, &kv, &[])), &["bad.gguf", "string of 1099511627776 bytes"]);
    assert!(started.elapsed().as_secs() < 5);
}

#[test]
fn gguf_tensor_sizes_that_overflow_are_refused_by_name() {
    let tensor = |dims: &[u64], offset: u64| {
        let mut t = gguf_string("blk.0.ffn_up.weight");
        t.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            t.extend_from_slice(&d.to_le_bytes());
        }
        t.extend_from_slice(&0u32.to_le_bytes()); // F32
        t.extend_from_slice(&offset.to_le_bytes());
        t
    };
    // Element counts that wrap around 64 bits, an offset at the end of the address space, a
    // terabyte tensor in a small file, and more dimensions than ggml has.
    for (dims, offset, named) in [
        (vec![1u64 << 32, 1 << 32, 2], 0, "too large"),
        (vec![16u64], u64::MAX - 8, "too large"),
        (vec![1u64 << 20, 1 << 18], 0, "past the end of the file"),
        (vec![1u64; 5], 0, "5 dimensions"),
    ] {
        let err = gguf_err(gguf(1, 0, &tensor(&dims, offset), &[0; 64]));
        assert_names(&err, &["bad.gguf", "blk.0.ffn_up.weight", named]);
    }
}

#[test]
fn a_ten_gigabyte_jsonl_line_is_refused_without_reading_it() {
    // A sparse file: 10 GiB long, one line, taking no disk.
    let path = std::env::temp_dir().join(format!("hone-long-line-{}.jsonl", std::process::id()));
    let f = fs::File::create(&path).unwrap();
    f.set_len(10 << 30).unwrap();
    drop(f);
    let started = std::time::Instant::now();
    let err = hone::io::read_text_lines(&path, hone::io::MAX_LINE_BYTES).err().map(|e| e.to_string());
    fs::remove_file(&path).unwrap();
    let err = err.expect("refused");
    assert!(err.contains(&format!("{}:1", path.display())) && err.contains("line longer than 67108864 bytes"), "{err}");
    assert!(started.elapsed().as_secs() < 10, "took {:?}", started.elapsed());
    // Lines within the limit read whole, and a long line is named by its number.
    let path = std::env::temp_dir().join(format!("hone-lines-{}.jsonl", std::process::id()));
    fs::write(&path, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n{\"text\": \"cccccccccccccccccccccc\"}\n").unwrap();
    let whole = hone::io::read_text_lines(&path, 40).unwrap();
    let err = hone::io::read_text_lines(&path, 20).err().map(|e| e.to_string());
    fs::remove_file(&path).unwrap();
    assert_eq!(whole, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n{\"text\": \"cccccccccccccccccccccc\"}\n");
    assert!(err.as_deref().is_some_and(|e| e.contains(":4: line longer than 20 bytes")), "{err:?}");
}

/// `weights` with a tensor added (f32 values, shape `[len]`).
fn with_tensor(bytes: &[u8], name: &str, values: &[f32]) -> Vec<u8> {
    let (mut h, mut data) = split(bytes);
    let start = data.len();
    data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    h[name] = serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [start, data.len()]});
    join(&h, &data)
}

/// A stored tensor the config's model has no place for (here a q_proj bias while config.json
/// says `attention_bias: false`) is refused by name and file, not dropped: the model would
/// differ from the one the weights were trained as. Rotary tables older checkpoints stored as
/// buffers are no such tensor (computed from the config, as transformers does).
#[test]
fn a_stored_tensor_the_config_leaves_out_is_refused_by_name() {
    let cfg: Value = serde_json::from_slice(&fs::read(common::fixtures().join("llama/config.json")).unwrap()).unwrap();
    let rows = cfg["num_attention_heads"].as_u64().unwrap() as usize * cfg["head_dim"].as_u64().unwrap_or(cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap()) as usize;
    let bias = "model.layers.1.self_attn.q_proj.bias";
    let msg = load_err(&llama_files().with("model.safetensors", with_tensor(&weights(), bias, &vec![0.5; rows])));
    assert_names(&msg, &["llama/model.safetensors", bias, "not part of the model the config describes", "1 such tensor"]);

    let buffers = with_tensor(&weights(), "model.layers.0.self_attn.rotary_emb.inv_freq", &[1.0, 0.5, 0.25, 0.125]);
    hone::model::load_model::<NdArray>(&llama_files().with("model.safetensors", buffers), &Default::default()).unwrap();
}
