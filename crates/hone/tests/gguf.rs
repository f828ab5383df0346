//! GGUF metadata and tensors of every listed type equal the `gguf` package's dequantization
//! bit for bit (tests/reference/make_gguf_fixtures.py).

mod common;

use hone::io::gguf::{Gguf, Value};
use hone::io::safetensors::SafeTensors;
use hone::io::{FileSource, MemSource};

const TYPES: [&str; 11] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"];

#[test]
fn every_type_dequantizes_like_the_gguf_package() {
    let dir = common::fixtures().join("gguf");
    let g = Gguf::open(Box::new(FileSource::open(&dir.join("types.gguf")).unwrap())).unwrap();
    let expected = SafeTensors::open(Box::new(FileSource::open(&dir.join("expected.safetensors")).unwrap())).unwrap();
    for t in TYPES {
        let (shape, ours) = g.read_f32(&format!("t.{t}")).unwrap();
        let (want_shape, theirs) = expected.read_f32(t).unwrap();
        assert_eq!(shape, want_shape, "{t}");
        let differ = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{t}: {differ} of {} values differ", ours.len());
    }
}

#[test]
fn metadata_of_every_value_type() {
    let path = common::fixtures().join("gguf/types.gguf");
    let g = Gguf::open(Box::new(FileSource::open(&path).unwrap())).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get("test.u8"), Some(&Value::U8(7)));
    assert_eq!(g.get("test.i32"), Some(&Value::I32(-42)));
    assert_eq!(g.get("test.u64").and_then(|v| v.as_u64()), Some(1 << 40));
    assert_eq!(g.get("test.f32"), Some(&Value::F32(0.25)));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(-1.5)));
    assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get("test.string").and_then(|v| v.as_str()), Some("héllo"));
    let strings: Vec<&str> = g.get("test.strings").unwrap().as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(strings, ["a", "bc", ""]);
    assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));

    // Version 2 has the same little-endian layout.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = Gguf::open(Box::new(MemSource::new("v2.gguf", bytes.clone()))).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.read_f32("t.q4_k").unwrap(), g.read_f32("t.q4_k").unwrap());

    // Truncation and a bad magic are named.
    let cut = Gguf::open(Box::new(MemSource::new("cut.gguf", bytes[..bytes.len() - 100].to_vec()))).err().unwrap().to_string();
    assert!(cut.contains("cut.gguf") && cut.contains("past the end"), "{cut}");
    bytes[0] = b'X';
    let bad = Gguf::open(Box::new(MemSource::new("bad.gguf", bytes))).err().unwrap().to_string();
    assert!(bad.contains("bad.gguf") && bad.contains("not a GGUF"), "{bad}");
}

/// A SentencePiece ("llama") vocabulary in a GGUF, without merges (as llama.cpp writes Llama 2
/// and Mistral): the tokenizer hone builds gives transformers' ids (BOS included) and decodes
/// alike (tests/reference/make_spm_gguf_fixture.py).
#[test]
fn sentencepiece_tokenizer_from_gguf_equals_transformers() {
    let dir = common::fixtures().join("gguf");
    let g = Gguf::open(Box::new(FileSource::open(&dir.join("spm_llama.gguf")).unwrap())).unwrap();
    let tok = hone::data::gguf_tokenizer::tokenizer_from_gguf(&g).unwrap();
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("spm_llama.json")).unwrap()).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
}
