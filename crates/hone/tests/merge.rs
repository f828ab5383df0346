//! `W + s·B·A` equals PEFT's merge_and_unload bit for bit in f32, and the merged directory is a
//! standard model: same keys and config, tokenizer copied, no LoRA keys, same logits as the
//! adapter applied on the fly.

mod common;

use burn::backend::NdArray;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::lora::merge::merge_to_dir;
use hone::lora::peft::Adapter;
use hone::model::load_model;
use hone::parity::rel_error;

fn open(path: &std::path::Path) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(path).unwrap())).unwrap()
}

#[test]
fn merge_equals_peft_merge_and_unload_bit_for_bit() {
    for (arch, which) in [("llama", "peft"), ("phi3", "hone")] {
        let fixtures = common::fixtures();
        let adapter = Adapter::read(&Dir(fixtures.join(format!("lora/{arch}_{which}_adapter")))).unwrap();
        let out = std::env::temp_dir().join(format!("hone-merge-{arch}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let report = merge_to_dir(&Dir(fixtures.join(arch)), &adapter, &out).unwrap();
        assert_eq!(report.merged_layers, adapter.layers.len());

        let merged = open(&out.join("model.safetensors"));
        let peft = open(&fixtures.join(format!("lora/{arch}_merged.safetensors")));
        for name in peft.tensors().keys() {
            let (_, ours) = merged.read_f32(name).unwrap();
            let (_, theirs) = peft.read_f32(name).unwrap();
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{arch}: {name}: {differ} of {} values differ from PEFT", ours.len());
        }
        // Same keys as the base, nothing else; the rest copied unchanged.
        let base = open(&fixtures.join(arch).join("model.safetensors"));
        assert_eq!(merged.tensors().keys().collect::<Vec<_>>(), base.tensors().keys().collect::<Vec<_>>());
        for name in base.tensors().keys().filter(|n| !peft.tensors().contains_key(*n)) {
            assert_eq!(merged.read_raw(name).unwrap().1, base.read_raw(name).unwrap().1, "{name}");
        }
        assert_eq!(std::fs::read(out.join("config.json")).unwrap(), std::fs::read(fixtures.join(arch).join("config.json")).unwrap());
        assert!(out.join("tokenizer.json").exists());

        // The merged model gives the logits of base + adapter.
        let device = Default::default();
        let ids = [3u32, 50, 7, 200, 11, 90, 4];
        let merged_model = load_model::<NdArray>(&Dir(out.clone()), &device).unwrap();
        let mut with_adapter = load_model::<NdArray>(&Dir(fixtures.join(arch)), &device).unwrap();
        adapter.attach(with_adapter.linears_mut()).unwrap();
        let a = merged_model.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let b = with_adapter.logits(&ids).into_data().to_vec::<f32>().unwrap();
        assert!(rel_error(&a, &b) < 1e-5);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn merge_refuses_an_existing_output_and_leaves_nothing_on_error() {
    let fixtures = common::fixtures();
    let adapter = Adapter::read(&Dir(fixtures.join("lora/phi3_hone_adapter"))).unwrap();
    // A phi3 adapter on a llama base: no such weights, and no output directory left behind.
    let out = std::env::temp_dir().join(format!("hone-merge-bad-{}", std::process::id()));
    let err = merge_to_dir(&Dir(fixtures.join("llama")), &adapter, &out).err().unwrap().to_string();
    assert!(err.contains("qkv_proj") || err.contains("no such weight"), "{err}");
    assert!(!out.exists());
    let existing = std::env::temp_dir();
    assert!(merge_to_dir(&Dir(fixtures.join("phi3")), &adapter, &existing).is_err());
}

#[test]
fn merge_into_an_nf4_checkpoint_uses_its_dequantized_weights() {
    let fixtures = common::fixtures();
    let adapter = Adapter::read(&Dir(fixtures.join("lora/llama_hone_adapter"))).unwrap();
    let out = std::env::temp_dir().join(format!("hone-merge-nf4-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let report = merge_to_dir(&Dir(fixtures.join("llama_bnb4")), &adapter, &out).unwrap();
    assert!(report.dequantized_nf4_base);
    assert_eq!(report.merged_layers, adapter.layers.len());
    let merged = open(&out.join("model.safetensors"));
    assert!(merged.tensors().keys().all(|k| !k.contains(".weight.")), "no quantization parts left");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    // Dense merged model == NF4 base with the adapter applied on the fly.
    let device = Default::default();
    let ids = [3u32, 50, 7, 200, 11, 90, 4];
    let dense = load_model::<NdArray>(&Dir(out.clone()), &device).unwrap();
    let mut nf4 = load_model::<NdArray>(&Dir(fixtures.join("llama_bnb4")), &device).unwrap();
    adapter.attach(nf4.linears_mut()).unwrap();
    let a = dense.logits(&ids).into_data().to_vec::<f32>().unwrap();
    let b = nf4.logits(&ids).into_data().to_vec::<f32>().unwrap();
    assert!(rel_error(&a, &b) < 1e-5, "{}", rel_error(&a, &b));
    std::fs::remove_dir_all(&out).unwrap();
}
