//! `hone merge --gguf` against llama.cpp (fixtures: tests/reference/make_llamacpp_fixtures.py):
//! ggml's Q8_0/Q4_0 quantization bit for bit, and on the default model (SmolLM2-135M's Q4_1
//! GGUF) with a seeded adapter, hone's merged GGUF (f16, q8_0, q4_0) read back by hone gives the
//! greedy tokens llama.cpp gives with the same file, and hone with the adapter unmerged gives
//! the tokens llama.cpp gives with the base and hone's LoRA GGUF.

mod common;

use burn::backend::NdArray;
use hone::export::gguf_merge::{merge_gguf, MergedType};
use hone::generate::{generate, GenerateConfig};
use hone::io::gguf::{GgmlType, Gguf, Value};
use hone::io::gguf_write::encode;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource, MemSource};
use hone::lora::peft::Adapter;
use hone::model::gguf::load_gguf;
use std::path::PathBuf;

fn dir() -> PathBuf {
    common::fixtures().join("llamacpp")
}

fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("HONE_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        home.join(".cache/hone/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "{} is missing: run `cargo xtask default-model` (cargo xtask test does)", path.display());
    path
}

#[test]
fn q8_0_and_q4_0_are_ggmls_reference_quantization() {
    let st = SafeTensors::open(Box::new(FileSource::open(&dir().join("quants.safetensors")).unwrap())).unwrap();
    let x = st.read_f32("x").unwrap().1;
    for (name, kind) in [("q8_0", GgmlType::Q8_0), ("q4_0", GgmlType::Q4_0)] {
        let want = st.read_raw(name).unwrap().1;
        assert_eq!(encode(kind, &x).unwrap(), want, "{name}");
    }
    assert!(encode(GgmlType::Q8_0, &x[..31]).is_none(), "not a whole block");
}

#[test]
fn merged_smollm2_gguf_gives_llama_cpps_greedy_tokens() {
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(dir().join("smollm2_merge.json")).unwrap()).unwrap();
    let ids = |k: &str| fixture[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let base = Gguf::open(Box::new(FileSource::open(&smollm2_gguf()).unwrap())).unwrap();
    let adapter = Adapter::read(&Dir(dir().join("smollm2_adapter"))).unwrap();
    let eos = base.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).unwrap() as u32;
    let cfg = GenerateConfig { max_new_tokens: fixture["tokens"].as_u64().unwrap() as usize, stop_ids: vec![eos], ..Default::default() };
    let device = Default::default();
    for (ty, file_type) in [("f16", 1), ("q8_0", 7), ("q4_0", 2)] {
        let mut bytes = Vec::new();
        let report = merge_gguf(&base, &adapter, MergedType::parse(ty).unwrap(), &mut |b| {
            bytes.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!((report.merged_layers, report.bytes), (adapter.layers.len(), bytes.len() as u64));
        let merged = Gguf::open(Box::new(MemSource::new(format!("merged-{ty}.gguf"), bytes))).unwrap();
        // The base's metadata rides along: tokenizer, chat template, architecture.
        for key in ["general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base"] {
            assert_eq!(merged.get(key), base.get(key), "{ty}: {key}");
        }
        assert_eq!(merged.get("general.file_type"), Some(&Value::U32(file_type)));
        assert_eq!(merged.tensors.len(), base.tensors.len());
        let (model, _, _) = load_gguf::<NdArray>(&merged, Default::default(), &device).unwrap();
        let out = generate(&model, &ids("prompt_ids"), &cfg);
        assert_eq!(out, ids(ty), "{ty}: hone's greedy tokens on its merged GGUF vs llama.cpp's");
        assert_ne!(out, ids("base"), "{ty}: the adapter changes the reply");
    }
    // Unmerged: hone with the PEFT adapter on the Q4_1 base gives the tokens llama.cpp gives with
    // hone's LoRA GGUF (`hone export --gguf`) on that base.
    let (mut model, _, _) = load_gguf::<NdArray>(&base, Default::default(), &device).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    assert_eq!(generate(&model, &ids("prompt_ids"), &cfg), ids("base_with_lora_gguf"));
}

/// `s·B·A` added to the base's (dequantized) rows, then each row scaled to the DoRA magnitude:
/// q/k rows, which the GGUF stores interleaved, take their magnitudes in the same order.
#[test]
fn dora_merged_gguf_gives_the_adapted_models_logits() {
    use hone::lora::peft::{add_adapters, to_host};
    use hone::lora::{LoraConfig, Targets};
    let base = Gguf::open(Box::new(FileSource::open(&smollm2_gguf()).unwrap())).unwrap();
    let device = Default::default();
    let (mut model, _, _) = load_gguf::<NdArray>(&base, Default::default(), &device).unwrap();
    let config = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::parse("q_proj,k_proj,v_proj,down_proj"), use_dora: true, init: Default::default(), seed: 3, ..Default::default() };
    add_adapters(model.linears_mut(), &config);
    let mut adapter = to_host(model.linears(), &config, "smollm2");
    for (i, l) in adapter.layers.iter_mut().enumerate() {
        l.b = (0..l.b.len()).map(|k| 0.01 * (((k * 5 + i) % 9) as f32 - 4.0)).collect();
        for (k, m) in l.magnitude.as_mut().unwrap().iter_mut().enumerate() {
            *m *= 1.0 + 0.2 * (((k * 3 + i) % 7) as f32 - 3.0) / 3.0;
        }
    }
    adapter.attach(model.linears_mut()).unwrap();
    let ids = [1u32, 504, 3458, 314, 260, 1789, 30, 216];
    let want = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
    let merged_logits = |adapter: &Adapter| {
        let mut bytes = Vec::new();
        merge_gguf(&base, adapter, MergedType::parse("f16").unwrap(), &mut |b| {
            bytes.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        let merged = Gguf::open(Box::new(MemSource::new("merged.gguf", bytes))).unwrap();
        let (m, _, _) = load_gguf::<NdArray>(&merged, Default::default(), &device).unwrap();
        m.logits(&ids).into_data().to_vec::<f32>().unwrap()
    };
    let err = hone::parity::rel_error(&merged_logits(&adapter), &want);
    // The same A and B merged without the magnitudes: far off, so the test sees them.
    let mut plain = adapter.clone();
    plain.use_dora = false;
    plain.layers.iter_mut().for_each(|l| l.magnitude = None);
    let without = hone::parity::rel_error(&merged_logits(&plain), &want);
    println!("DoRA merged f16 GGUF vs the adapted model: {err:.2e} (without the magnitudes {without:.2e})");
    assert!(err < 2e-3 && without > 20.0 * err, "{err:.3e} / {without:.3e}");
}
