//! Token ids equal Python `tokenizers`' for the fixture strings.

mod common;

use hone::data::Tokenizer;
use hone::io::Dir;

#[test]
fn ids_match_python_tokenizers() {
    let tok = Tokenizer::open(&Dir(common::fixtures().join("llama"))).unwrap();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "ids for {text:?}");
    }
}
