//! PEFT adapter files both ways: an adapter hone writes loads in PEFT (the reference script
//! loads the committed one and records PEFT's logits), and one PEFT writes loads in hone; both
//! give PEFT's logits. hone's writer is deterministic.

mod common;

use burn::backend::NdArray;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource, MemFiles};
use hone::lora::peft::{add_adapters, to_host, Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use hone::lora::{LoraConfig, Targets};
use hone::model::load_model;
use hone::parity::rel_error;
use std::path::PathBuf;

type B = NdArray;

fn lora_dir() -> PathBuf {
    common::fixtures().join("lora")
}

fn expected(arch: &str) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(&lora_dir().join(format!("{arch}_adapter_logits.safetensors"))).unwrap())).unwrap()
}

/// The adapter hone wrote for the fixture: hone's seeded init for A, and B drawn from the same
/// generator (hone starts B at zero, which would leave the logits unchanged).
fn hone_adapter(arch: &str) -> Adapter {
    let device = Default::default();
    let mut model = load_model::<B>(&Dir(common::fixtures().join(arch)), &device).unwrap();
    let config = LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: Targets::parse("q_proj,v_proj,down_proj,qkv_proj"), use_rslora: true, use_dora: false, init: Default::default(), seed: 7 };
    add_adapters(model.linears_mut(), &config);
    let b_source = LoraConfig { seed: 8, ..config.clone() };
    let mut adapter = to_host(model.linears(), &config, &format!("tests/fixtures/{arch}"));
    for (i, layer) in adapter.layers.iter_mut().enumerate() {
        let [out, r] = layer.b_shape;
        // An [r, out] draw, scaled: any fixed non-zero B will do.
        let draw = b_source.init::<B>(i as u64, 1, out, &device).lora_a.val().into_data().to_vec::<f32>().unwrap();
        layer.b = (0..out * r).map(|k| draw[k % draw.len()] * (1.0 + (k / draw.len()) as f32)).collect();
    }
    adapter
}

fn logits_with(arch: &str, adapter: &Adapter, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let mut model = load_model::<B>(&Dir(common::fixtures().join(arch)), &device).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    model.logits(ids).into_data().to_vec::<f32>().unwrap()
}

#[test]
#[ignore = "writes the committed fixture; run with --ignored, then tests/reference/make_lora_fixtures.py"]
fn write_hone_adapter_fixtures() {
    for arch in ["llama", "phi3"] {
        let adapter = hone_adapter(arch);
        let dir = lora_dir().join(format!("{arch}_hone_adapter"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), adapter.config_json()).unwrap();
        std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), adapter.weights_bytes()).unwrap();
    }
}

#[test]
fn hone_writes_the_same_bytes_for_the_same_tensors() {
    for arch in ["llama", "phi3"] {
        let adapter = hone_adapter(arch);
        let dir = lora_dir().join(format!("{arch}_hone_adapter"));
        assert_eq!(adapter.weights_bytes(), std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap(), "{arch}");
        assert_eq!(adapter.config_json(), std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap(), "{arch}");
        // Reading it back and writing again is the identity.
        let reread = Adapter::read(&Dir(dir)).unwrap();
        assert_eq!(reread.weights_bytes(), adapter.weights_bytes());
    }
}

#[test]
fn hone_adapter_in_peft_gives_hones_logits() {
    for arch in ["llama", "phi3"] {
        let e = expected(arch);
        let ids = hone::parity::read_ids(&e, "ids").unwrap();
        let adapter = Adapter::read(&Dir(lora_dir().join(format!("{arch}_hone_adapter")))).unwrap();
        let ours = logits_with(arch, &adapter, &ids);
        let (_, peft) = e.read_f32("hone_adapter.logits").unwrap();
        let err = rel_error(&ours, &peft);
        println!("{arch}: hone adapter, hone vs PEFT logits rel error {err:.2e}");
        assert!(err < 1e-4, "{arch}: {err:.3e}");
        // The adapter really changes the output.
        let (_, base) = e.read_f32("base.logits").unwrap();
        assert!(rel_error(&ours, &base) > 1e-3);
    }
}

#[test]
fn peft_adapter_in_hone_gives_pefts_logits() {
    for arch in ["llama", "phi3"] {
        let e = expected(arch);
        let ids = hone::parity::read_ids(&e, "ids").unwrap();
        let adapter = Adapter::read(&Dir(lora_dir().join(format!("{arch}_peft_adapter")))).unwrap();
        let ours = logits_with(arch, &adapter, &ids);
        let (_, peft) = e.read_f32("peft_adapter.logits").unwrap();
        let err = rel_error(&ours, &peft);
        println!("{arch}: PEFT adapter, hone vs PEFT logits rel error {err:.2e}");
        assert!(err < 1e-4, "{arch}: {err:.3e}");
    }
}

#[test]
fn bf16_adapter_reads() {
    // PEFT adapters are often saved in bf16: rewrite the PEFT fixture's tensors as BF16.
    let dir = lora_dir().join("llama_peft_adapter");
    let src = SafeTensors::open(Box::new(FileSource::open(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap())).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, info) in src.tensors() {
        let (_, values) = src.read_f32(name).unwrap();
        let start = data.len();
        for v in &values {
            data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
        }
        header.insert(name.clone(), serde_json::json!({"dtype": "BF16", "shape": info.shape, "data_offsets": [start, data.len()]}));
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&data);
    let files = MemFiles::new("bf16")
        .with(ADAPTER_CONFIG_FILE, std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
        .with(ADAPTER_WEIGHTS_FILE, bytes);
    let bf16 = Adapter::read(&files).unwrap();
    let f32 = Adapter::read(&Dir(dir)).unwrap();
    assert_eq!(bf16.layers.len(), f32.layers.len());
    for (a, b) in bf16.layers.iter().zip(&f32.layers) {
        assert!(rel_error(&a.a, &b.a) < 1e-2 && rel_error(&a.b, &b.b) < 1e-2);
    }
}

#[test]
fn adapter_for_another_model_is_refused() {
    let device = Default::default();
    let mut model = load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let phi3 = Adapter::read(&Dir(lora_dir().join("phi3_peft_adapter"))).unwrap();
    let err = phi3.attach(model.linears_mut()).unwrap_err().to_string();
    assert!(err.contains("phi3_peft_adapter/adapter_model.safetensors") && err.contains("no such layer"), "{err}");
}

/// The PEFT fixture's files with its adapter_config.json changed by `edit`.
fn peft_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> MemFiles {
    let dir = lora_dir().join("llama_peft_adapter");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut cfg);
    MemFiles::new("edited").with(ADAPTER_CONFIG_FILE, serde_json::to_vec(&cfg).unwrap()).with(ADAPTER_WEIGHTS_FILE, std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap())
}

fn read_err(files: &MemFiles) -> String {
    match Adapter::read(files) {
        Ok(_) => panic!("an inconsistent adapter was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn adapter_config_that_disagrees_with_its_tensors_is_refused_by_name() {
    // The unedited files read (the fixture has rank 4 and lists every module).
    assert_eq!(Adapter::read(&peft_with_config(|_| {})).unwrap().r, 4);
    // r says one thing, the tensors another: the scale alpha / r would silently differ from PEFT's.
    let err = read_err(&peft_with_config(|c| c["r"] = 1073741824u64.into()));
    assert!(err.contains("edited/adapter_model.safetensors") && err.contains("lora_A.weight") && err.contains("has rank 4") && err.contains("r = 1073741824"), "{err}");
    for bad in [serde_json::json!(0), serde_json::json!(-3), serde_json::json!("8")] {
        let err = read_err(&peft_with_config(|c| c["r"] = bad.clone()));
        assert!(err.contains("edited/adapter_config.json") && err.contains("`r` must be a positive whole number"), "{err}");
    }
    let err = read_err(&peft_with_config(|c| c["lora_alpha"] = "sixteen".into()));
    assert!(err.contains("`lora_alpha` must be a number"), "{err}");
    // A tensor of a module the config does not target (PEFT would drop it on loading).
    let err = read_err(&peft_with_config(|c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj"])));
    assert!(err.contains("down_proj.lora_A.weight") && err.contains("not one edited/adapter_config.json targets"), "{err}");
    let err = read_err(&peft_with_config(|c| c["exclude_modules"] = serde_json::json!(["model.layers.1.mlp.up_proj"])));
    assert!(err.contains("model.layers.1.mlp.up_proj.lora_A.weight"), "{err}");
    // Names as PEFT matches them: last components, a whole-name regex, all-linear.
    for ok in [serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), serde_json::json!(".*_proj"), serde_json::json!("all-linear")] {
        assert!(Adapter::read(&peft_with_config(|c| c["target_modules"] = ok.clone())).is_ok(), "{ok}");
    }
    let err = read_err(&peft_with_config(|c| c["target_modules"] = serde_json::json!("proj")));
    assert!(err.contains("not one edited/adapter_config.json targets"), "{err}");
    // Settings hone does not honour are refused, not ignored.
    for (key, value, named) in [
        ("rank_pattern", serde_json::json!({"q_proj": 8}), "rank_pattern"),
        ("alpha_pattern", serde_json::json!({"q_proj": 16}), "alpha_pattern"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save"),
        ("lora_bias", serde_json::json!(true), "lora_bias"),
        ("bias", serde_json::json!("all"), "bias"),
    ] {
        let err = read_err(&peft_with_config(|c| c[key] = value.clone()));
        assert!(err.contains("edited/adapter_config.json") && err.contains(named), "{key}: {err}");
    }
}
