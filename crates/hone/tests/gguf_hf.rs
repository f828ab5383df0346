//! Hugging Face bases written as GGUF (`hone merge --model DIR --gguf`, export::gguf_hf) against
//! llama.cpp (fixtures: `make_llamacpp_fixtures.py hf-gguf`, llama-cpp-python 0.3.36 from source):
//! - without an adapter, hone's f32 GGUF has the metadata llama.cpp's `convert_hf_to_gguf.py`
//!   writes, key by key and value by value (`general.size_label` aside), and the same tensors,
//!   byte for byte (SHA-256), for llama, mistral, qwen2, phi3 (LongRoPE factors), a Llama 3.1
//!   (bf16, `rope_freqs`), SmolLM2's shapes, a tokenizer with tokenizer_config.json (special
//!   tokens, chat template) and a SentencePiece tokenizer.model under llama and phi3 (each
//!   class lays the added tokens over it its own way);
//! - merged with the PEFT adapters of tests/fixtures/llamacpp, the file llama.cpp ran is the one
//!   hone writes today (SHA-256), and llama.cpp's logits with it equal hone's with the adapter.

mod common;

use burn::backend::NdArray;
use hone::export::gguf_hf::hf_to_gguf;
use hone::export::gguf_merge::MergedType;
use hone::io::gguf::{Gguf, Value};
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSet, FileSource, MemSource};
use hone::lora::peft::Adapter;
use hone::model::load_model;
use hone::parity::read_ids;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const BASES: [&str; 9] = ["llama", "mistral", "qwen2", "phi3", "llama3", "smollm2", "llama_chat", "llama_spm", "phi3_spm"];
/// Merged bases and whose adapter they take.
const MERGED: [(&str, &str); 6] = [("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"), ("phi3", "phi3"), ("llama_spm", "llama"), ("phi3_spm", "phi3")];

fn dir() -> PathBuf {
    common::fixtures().join("llamacpp")
}

/// The base's directory: `llama_chat` is the llama fixture with the chat fixture's tokenizer,
/// `<arch>_spm` a fixture with tests/fixtures/spm's SentencePiece tokenizer.
fn base_dir(name: &str) -> PathBuf {
    let parts: &[(&str, &str)] = match name {
        "llama_chat" => &[("llama", "config.json"), ("llama", "model.safetensors"), ("chat", "tokenizer.json"), ("chat", "tokenizer_config.json")],
        "llama_spm" => &[("llama", "config.json"), ("llama", "model.safetensors"), ("spm", "tokenizer.model"), ("spm", "tokenizer_config.json")],
        "phi3_spm" => &[("phi3", "config.json"), ("phi3", "model.safetensors"), ("spm", "tokenizer.model"), ("spm", "tokenizer_config.json")],
        _ => return common::fixtures().join(name),
    };
    // One directory per call: the tests run in parallel.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("hone-gguf-hf-{name}-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for (src, f) in parts {
        std::fs::copy(common::fixtures().join(src).join(f), d.join(f)).unwrap();
    }
    d
}

fn write(files: &dyn FileSet, adapter: Option<&Adapter>) -> Vec<u8> {
    write_as(files, adapter, MergedType::F32)
}

fn write_as(files: &dyn FileSet, adapter: Option<&Adapter>, ty: MergedType) -> Vec<u8> {
    let mut out = Vec::new();
    hf_to_gguf(files, adapter, ty, "tiny", &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    out
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A GGUF value as the fixture describes it: gguf-py's type name(s) and the value as JSON.
fn describe(v: &Value) -> (String, Json) {
    match v {
        Value::Array(items) => {
            let inner = items.first().map_or("?".to_string(), |i| describe(i).0);
            (format!("ARRAY/{inner}"), Json::Array(items.iter().map(|i| describe(i).1).collect()))
        }
        Value::String(s) => ("STRING".into(), Json::String(s.clone())),
        Value::Bool(b) => ("BOOL".into(), Json::Bool(*b)),
        Value::U32(x) => ("UINT32".into(), (*x).into()),
        Value::I32(x) => ("INT32".into(), (*x).into()),
        Value::U64(x) => ("UINT64".into(), (*x).into()),
        Value::I64(x) => ("INT64".into(), (*x).into()),
        Value::F32(x) => ("FLOAT32".into(), Json::from(f64::from(*x))),
        other => (format!("{other:?}"), Json::Null),
    }
}

/// The same value: floats compared as the f32 they were written as.
fn same(ours: &Json, theirs: &Json) -> bool {
    match (ours, theirs) {
        (Json::Number(a), Json::Number(b)) if a.is_f64() || b.is_f64() => a.as_f64().map(|x| x as f32) == b.as_f64().map(|x| x as f32),
        (Json::Array(a), Json::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y)),
        _ => ours == theirs,
    }
}

#[test]
fn hone_writes_the_gguf_llama_cpps_converter_writes() {
    for name in BASES {
        let want: Json = serde_json::from_slice(&std::fs::read(dir().join(format!("hf_{name}.json"))).unwrap()).unwrap();
        let bytes = write(&Dir(base_dir(name)), None);
        let ours = Gguf::open(Box::new(MemSource::new(format!("{name}.gguf"), bytes))).unwrap();
        let meta = want["metadata"].as_object().unwrap();
        for (key, entry) in meta {
            if key == "general.size_label" {
                assert!(ours.get(key).is_none(), "{name}: hone does not write {key}");
                continue;
            }
            let v = ours.get(key).unwrap_or_else(|| panic!("{name}: {key} missing"));
            let (ty, value) = describe(v);
            assert_eq!(ty, entry["type"].as_str().unwrap(), "{name} {key}: type");
            assert!(same(&value, &entry["value"]), "{name} {key}: {value} vs {}", entry["value"]);
        }
        let extra: Vec<_> = ours.metadata.keys().filter(|k| !meta.contains_key(*k)).collect();
        assert!(extra.is_empty(), "{name}: keys the converter does not write: {extra:?}");
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(ours.tensors.len(), tensors.len(), "{name}: tensor count");
        for t in tensors {
            let tn = t["name"].as_str().unwrap();
            let o = ours.tensors.get(tn).unwrap_or_else(|| panic!("{name}: {tn} missing"));
            let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!((o.shape(), format!("{:?}", o.kind)), (shape, t["type"].as_str().unwrap().to_string()), "{name} {tn}: shape and type");
            let values = ours.read_f32(tn).unwrap().1;
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(sha256(&raw), t["sha256"].as_str().unwrap(), "{name} {tn}: values differ from the converter's");
        }
        println!("{name}: {} keys and {} tensors as the converter writes them", meta.len(), tensors.len());
    }
}

/// Which tensors stay f32, which fall back to f16, and the F16 / Q8_0 bytes: as the converter's
/// `--outtype f16` and `q8_0` files (qwen2's biases included).
#[test]
fn f16_and_q8_0_files_store_each_tensor_as_the_converter_does() {
    for (name, ty, label) in [("llama", MergedType::F16, "f16"), ("llama", MergedType::Q8_0, "q8_0"), ("qwen2", MergedType::F16, "f16"), ("qwen2", MergedType::Q8_0, "q8_0")] {
        let want: Json = serde_json::from_slice(&std::fs::read(dir().join(format!("hf_{name}_{label}.json"))).unwrap()).unwrap();
        let bytes = write_as(&Dir(base_dir(name)), None, ty);
        let ours = Gguf::open(Box::new(MemSource::new(format!("{name}.gguf"), bytes.clone()))).unwrap();
        assert_eq!(ours.get("general.file_type").and_then(Value::as_u64), want["file_type"]["value"].as_u64(), "{name} {label}: file type");
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(ours.tensors.len(), tensors.len());
        for t in tensors {
            let tn = t["name"].as_str().unwrap();
            let o = &ours.tensors[tn];
            assert_eq!(format!("{:?}", o.kind).to_uppercase(), t["type"].as_str().unwrap(), "{name} {label} {tn}: type");
            let raw = &bytes[o.offset as usize..o.offset as usize + o.byte_len()];
            assert_eq!(sha256(raw), t["sha256"].as_str().unwrap(), "{name} {label} {tn}: bytes differ from the converter's");
        }
        println!("{name} {label}: {} tensors stored as the converter stores them", tensors.len());
    }
}

#[test]
fn llama_cpp_running_hones_merged_gguf_gives_hones_logits() {
    let device = Default::default();
    for (name, arch) in MERGED {
        let want: Json = serde_json::from_slice(&std::fs::read(dir().join(format!("hf_{name}.json"))).unwrap()).unwrap();
        let adapter = Adapter::read(&Dir(dir().join(format!("{arch}_adapter")))).unwrap();
        let bytes = write(&Dir(base_dir(name)), Some(&adapter));
        assert_eq!(
            sha256(&bytes),
            want["hone_merged_sha256"].as_str().unwrap(),
            "{name}: hone's merged GGUF is not the file llama.cpp ran; rerun `make_llamacpp_fixtures.py hf-gguf`"
        );
        let st = SafeTensors::open(Box::new(FileSource::open(&dir().join(format!("hf_{name}_merged.safetensors"))).unwrap())).unwrap();
        let ids = read_ids(&st, "ids").unwrap();
        let mut model = load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
        adapter.attach(model.linears_mut()).unwrap();
        let ours = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let llama_cpp = st.read_f32("llama_cpp").unwrap().1;
        let diff = ours.iter().zip(&llama_cpp).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let rel = diff / llama_cpp.iter().map(|v| v.abs()).fold(0f32, f32::max);
        println!("{name}: llama.cpp on hone's merged GGUF vs hone with the adapter: {rel:.2e} (max |Δ| / max |ref|)");
        assert!(rel < 1e-4, "{name}: {rel:.2e}");
    }
}

#[test]
fn tokenizers_hone_cannot_write_for_llama_cpp_are_refused_with_the_way_round() {
    let d = std::env::temp_dir().join(format!("hone-gguf-hf-spm-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixtures().join("llama").join(f), d.join(f)).unwrap();
    }
    let mut tok: Json = serde_json::from_slice(&std::fs::read(common::fixtures().join("llama/tokenizer.json")).unwrap()).unwrap();
    let fail = |d: &PathBuf| hf_to_gguf(&Dir(d.clone()), None, MergedType::F16, "x", &mut |_| Ok(())).unwrap_err().to_string();
    // A pre-tokenizer llama.cpp has no name for here.
    tok["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    std::fs::write(d.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let e = fail(&d);
    assert!(e.contains("pre-tokenizer") && e.contains("convert_hf_to_gguf.py") && e.contains("tokenizer.json"), "{e}");
    // SentencePiece-style (byte fallback) without tokenizer.model, which the converter reads.
    tok["model"]["byte_fallback"] = Json::Bool(true);
    std::fs::write(d.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let e = fail(&d);
    assert!(e.contains("SentencePiece") && e.contains("--out"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Llama 3.1's rope scaling read back from the GGUF llama.cpp's converter writes (hone's file is
/// that file, byte for byte: `hone_writes_the_gguf_llama_cpps_converter_writes`): its
/// `rope_freqs.weight` divisors give transformers' logits for the HF checkpoint (4.4e-7). Read as
/// plain rope, as hone did before, they were 1.1e-1 off.
#[test]
fn a_llama31_gguf_is_read_with_its_rope_factors() {
    let dir = common::fixtures().join("llama3");
    let g = Gguf::open(Box::new(MemSource::new("llama3.gguf", write(&Dir(dir.clone()), None)))).unwrap();
    assert!(g.tensors.contains_key("rope_freqs.weight"));
    let device = Default::default();
    let (model, _, _) = hone::model::gguf::load_gguf::<NdArray>(&g, Default::default(), &device).unwrap();
    assert!(matches!(model.config.rope, hone::model::Rope::Divisors(_)), "{:?}", model.config.rope);
    let expected = SafeTensors::open(Box::new(FileSource::open(&dir.join("expected.safetensors")).unwrap())).unwrap();
    for k in 0..2 {
        let ids = read_ids(&expected, &format!("ids_{k}")).unwrap();
        let (_, reference) = expected.read_f32(&format!("logits_{k}")).unwrap();
        let ours = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let err = hone::parity::rel_error(&ours, &reference);
        println!("llama3 GGUF input {k}: rel error {err:.2e} against transformers");
        assert!(err < common::TOLERANCE, "input {k}: rel error {err:.3e}");
    }
}

/// Linear rope scaling (`llama.rope.scaling.type`, `.factor`) read back: the GGUF gives the
/// logits of the HF checkpoint it was written from; a scaling hone does not implement (YaRN) is
/// refused by key, not read as plain rope.
#[test]
fn a_gguf_with_linear_rope_scaling_is_read_with_it_and_yarn_is_refused() {
    let llama = common::fixtures().join("llama");
    let mut config: Json = serde_json::from_slice(&std::fs::read(llama.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0});
    let files = hone::io::MemFiles::new("linear")
        .with("config.json", serde_json::to_vec(&config).unwrap())
        .with("model.safetensors", std::fs::read(llama.join("model.safetensors")).unwrap())
        .with("tokenizer.json", std::fs::read(llama.join("tokenizer.json")).unwrap());
    let device = Default::default();
    let hf = load_model::<NdArray>(&files, &device).unwrap();
    assert_eq!(hf.config.rope, hone::model::Rope::Linear { factor: 4.0 });
    let bytes = write(&files, None);
    let g = Gguf::open(Box::new(MemSource::new("linear.gguf", bytes.clone()))).unwrap();
    let (gguf, _, _) = hone::model::gguf::load_gguf::<NdArray>(&g, Default::default(), &device).unwrap();
    assert_eq!(gguf.config.rope, hone::model::Rope::Linear { factor: 4.0 });
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 300) as u32).collect();
    let (a, b) = (hf.logits(&ids).into_data().to_vec::<f32>().unwrap(), gguf.logits(&ids).into_data().to_vec::<f32>().unwrap());
    let err = hone::parity::rel_error(&b, &a);
    assert!(err < 1e-6, "linear rope: GGUF vs HF rel error {err:.3e}");

    // The same file saying YaRN: refused by its key. (A GGUF string: u32 type, u64 length, bytes.)
    let key = b"llama.rope.scaling.type";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the key is written") + key.len() + 4 + 8;
    assert_eq!(&bytes[at..at + 6], b"linear");
    let mut yarn = bytes.clone();
    yarn[at..at + 6].copy_from_slice(b"yarn__");
    let g = Gguf::open(Box::new(MemSource::new("yarn.gguf", yarn))).unwrap();
    let msg = hone::model::gguf::config_from_gguf(&g).unwrap_err().to_string();
    assert!(msg.contains("yarn.gguf") && msg.contains("yarn__") && msg.contains("llama.rope.scaling.type"), "{msg}");
}
