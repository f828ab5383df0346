//! Dataset formats, chat templates and loss masks equal what TRL's SFTTrainer produces
//! (tests/reference/make_data_fixtures.py), and bad data gives clear errors.

mod common;

use hone::data::dataset::{encode, parse_jsonl, parse_line, EncodeOptions};
use hone::data::{ChatTemplate, Format, Message, Tokenizer};
use hone::io::{Dir, MemFiles};

fn chat_dir() -> Dir {
    Dir(common::fixtures().join("chat"))
}

#[test]
fn ids_and_labels_match_trl() {
    let tok = Tokenizer::open(&chat_dir()).unwrap();
    let template = ChatTemplate::open(&chat_dir()).unwrap().expect("fixture has a template");
    assert!(template.has_generation_markers);
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixtures().join("chat/cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let format = Format::parse(case["format"].as_str().unwrap()).unwrap();
        let opts = EncodeOptions { train_on_completions_only: case["loss"] != "all", max_len: None };
        for (row, want) in case["rows"].as_array().unwrap().iter().zip(case["expected"].as_array().unwrap()) {
            // Detected and explicit formats agree.
            let detected = parse_line(&row.to_string(), None, "case").unwrap();
            let example = parse_line(&row.to_string(), Some(format), "case").unwrap();
            assert_eq!(detected, example);
            let sample = encode(&example, &tok, Some(&template), template.eos_token.as_deref(), opts).unwrap();
            let ids: Vec<u32> = want["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let labels: Vec<i64> = want["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(sample.input_ids, ids, "{} / {}: ids", case["format"], case["loss"]);
            assert_eq!(sample.labels, labels, "{} / {}: labels", case["format"], case["loss"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn chat_template_renders_like_transformers() {
    let template = ChatTemplate::open(&chat_dir()).unwrap().unwrap();
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixtures().join("chat/cases.json")).unwrap()).unwrap();
    let chat = cases.as_array().unwrap().iter().find(|c| c["format"] == "chat").unwrap();
    let messages: Vec<Message> = serde_json::from_value(chat["rows"][0]["messages"].clone()).unwrap();
    let rendered = template.render(&messages, false).unwrap();
    assert_eq!(rendered.text, std::fs::read_to_string(common::fixtures().join("chat/rendered.txt")).unwrap());
    assert_eq!(rendered.generation_spans.len(), 2);
    assert!(template.render(&messages[..2], true).unwrap().text.ends_with("<|assistant|>\n"));
}

#[test]
fn templates_without_generation_markers_mask_assistant_turns_too() {
    let tok = Tokenizer::open(&chat_dir()).unwrap();
    let marked = ChatTemplate::open(&chat_dir()).unwrap().unwrap();
    let plain_source = marked.source().replace("{% generation %}", "").replace("{% endgeneration %}", "");
    let plain = ChatTemplate::new(&plain_source, None, Some("<|end|>".into()), "plain").unwrap();
    assert!(!plain.has_generation_markers);
    let example = parse_line(
        r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello."},{"role":"user","content":"Bye"},{"role":"assistant","content":"Bye!"}]}"#,
        None,
        "x",
    )
    .unwrap();
    let a = encode(&example, &tok, Some(&marked), None, EncodeOptions::default()).unwrap();
    let b = encode(&example, &tok, Some(&plain), None, EncodeOptions::default()).unwrap();
    assert_eq!(a, b);
    assert!(a.trained_tokens() > 0 && a.trained_tokens() < a.input_ids.len());
}

#[test]
fn truncation_keeps_the_first_tokens() {
    let tok = Tokenizer::open(&chat_dir()).unwrap();
    let ex = parse_line(r#"{"text": "The quick brown fox jumps over the lazy dog, twice."}"#, None, "x").unwrap();
    let full = encode(&ex, &tok, None, Some("<|end|>"), EncodeOptions::default()).unwrap();
    let cut = encode(&ex, &tok, None, Some("<|end|>"), EncodeOptions { max_len: Some(5), ..Default::default() }).unwrap();
    assert_eq!(cut.input_ids, full.input_ids[..5]);
}

#[test]
fn bad_lines_are_named_or_counted() {
    let text = "{\"text\": \"ok\"}\n\n{\"text\": \"also ok\"}\n{not json\n{\"prompt\": \"p\"}\n{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n";
    let err = parse_jsonl(text, "data.jsonl", None, false).unwrap_err().to_string();
    assert!(err.starts_with("data.jsonl:4:") && err.contains("malformed JSON"), "{err}");
    let err = parse_jsonl("{\"prompt\": \"p\"}\n", "d.jsonl", Some(Format::Completion), false).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:1") && err.contains("missing field `completion`"), "{err}");
    let err = parse_jsonl("{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}", "c.jsonl", None, false).unwrap_err().to_string();
    assert!(err.contains("c.jsonl:1") && err.contains("unknown role `wizard`"), "{err}");
    let err = parse_jsonl("{\"prompt\": \"p\"}", "u.jsonl", None, false).unwrap_err().to_string();
    assert!(err.contains("u.jsonl:1") && err.contains("unknown format"), "{err}");
    let (examples, skipped) = parse_jsonl(text, "data.jsonl", None, true).unwrap();
    assert_eq!((examples.len(), skipped), (2, 3));
    let err = parse_jsonl("\n\n", "empty.jsonl", None, false).unwrap_err().to_string();
    assert!(err.contains("empty.jsonl") && err.contains("empty dataset"), "{err}");
}

#[test]
fn chat_data_without_a_template_is_an_error() {
    let tok = Tokenizer::open(&chat_dir()).unwrap();
    assert!(ChatTemplate::open(&MemFiles::new("none")).unwrap().is_none());
    let ex = parse_line(r#"{"messages":[{"role":"user","content":"Hi"}]}"#, None, "x").unwrap();
    let err = encode(&ex, &tok, None, None, EncodeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("chat template"), "{err}");
}
