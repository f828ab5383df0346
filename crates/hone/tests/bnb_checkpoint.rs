//! `hone quantize` writes what transformers' own 4-bit save writes, byte for byte in every
//! quantized tensor; hone loads such a checkpoint as stored (no requantizing) with
//! bitsandbytes' logits.

mod common;

use burn::backend::NdArray;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::model::load::is_decoder_linear;
use hone::model::quantize::quantize_to_dir;
use hone::model::{load_model, load_model_with, LoadOptions, Nf4Options};
use hone::parity::{read_ids, rel_error};

fn open(path: &std::path::Path) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(path).unwrap())).unwrap()
}

#[test]
fn quantize_equals_transformers_4bit_save() {
    let fixtures = common::fixtures();
    let out = std::env::temp_dir().join(format!("hone-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let report = quantize_to_dir(&Dir(fixtures.join("llama")), &out, Nf4Options::default()).unwrap();
    assert_eq!(report.quantized, 14);
    let ours = open(&out.join("model.safetensors"));
    let theirs = open(&fixtures.join("llama_bnb4/model.safetensors"));
    assert_eq!(ours.tensors().keys().collect::<Vec<_>>(), theirs.tensors().keys().collect::<Vec<_>>());
    for (name, info) in theirs.tensors() {
        let (our_info, our_bytes) = ours.read_raw(name).unwrap();
        assert_eq!((our_info.dtype, &our_info.shape), (info.dtype, &info.shape), "{name}");
        assert_eq!(our_bytes, theirs.read_raw(name).unwrap().1, "{name}: bytes differ");
    }
    // Six parts per quantized weight: codes, absmax, nested absmax and map, code map, state.
    let quantized_parts = theirs.tensors().keys().filter(|n| is_decoder_linear(n) || n.contains(".weight.")).count();
    assert_eq!(quantized_parts, 14 * 6);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let theirs_cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures.join("llama_bnb4/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"], theirs_cfg["quantization_config"]);
    // Embeddings and lm_head dominate this tiny model; the linears shrink ~7x.
    assert!(report.bytes_after < report.bytes_before);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn prequantized_checkpoint_loads_with_bitsandbytes_logits() {
    let fixtures = common::fixtures();
    let dir = fixtures.join("llama_bnb4");
    let e = open(&dir.join("expected.safetensors"));
    let ids = read_ids(&e, "ids").unwrap();
    let (_, reference) = e.read_f32("logits").unwrap();
    let device = Default::default();
    let model = load_model::<NdArray>(&Dir(dir), &device).unwrap();
    assert!(model.linears().iter().filter(|(n, _)| n != "lm_head").all(|(_, l)| l.weight.is_quantized()));
    let ours = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
    let err = rel_error(&ours, &reference);
    println!("pre-quantized checkpoint: rel error {err:.2e}");
    assert!(err < 1e-4, "{err:.3e}");
    // Quantizing on load gives the same model.
    let on_load = load_model_with::<NdArray>(&Dir(fixtures.join("llama")), LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    let ours = on_load.logits(&ids).into_data().to_vec::<f32>().unwrap();
    assert!(rel_error(&ours, &reference) < 1e-4);
}

#[test]
fn other_quantization_configs_are_refused() {
    let cfg = serde_json::json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 1, "quantization_config": {"quant_method": "gptq", "bits": 4}});
    let err = hone::model::Config::from_json(&serde_json::to_vec(&cfg).unwrap(), "x/config.json").unwrap_err().to_string();
    assert!(err.contains("x/config.json") && err.contains("gptq"), "{err}");
}
