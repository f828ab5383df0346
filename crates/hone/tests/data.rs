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

/// Completion examples whose prompts are `words` long (the completion "Yes." follows).
fn completions(prompt_words: &[usize]) -> String {
    prompt_words
        .iter()
        .map(|&n| serde_json::json!({"prompt": format!("{} Answer:", vec!["word"; n].join(" ")), "completion": " Yes."}).to_string() + "\n")
        .collect()
}

#[test]
fn data_with_no_counted_token_is_refused_by_cause() {
    use hone::train::run::{counted_in, require_eval_targets, samples_from_jsonl};
    let tok = Tokenizer::open(&chat_dir()).unwrap();
    let template = ChatTemplate::open(&chat_dir()).unwrap();
    let load = |text: &str, opts| samples_from_jsonl(text, "qa.jsonl", None, false, &tok, template.as_ref(), opts).unwrap();
    let cut = |max| EncodeOptions { max_len: Some(max), ..Default::default() };

    // Every prompt is longer than 32 tokens: every completion is cut away.
    let long = completions(&[40, 50, 60]);
    let s = load(&long, cut(32));
    assert_eq!((s.samples.len(), s.without_targets, s.lost_to_max_len, counted_in(&s.samples)), (3, 3, 3, 0));
    let err = s.require_targets("qa.jsonl", Some(32)).unwrap_err().to_string();
    assert!(err.contains("qa.jsonl") && err.contains("3 of 3 lost their completion to max_len 32"), "{err}");
    // Nothing to score is no loss of 0 and no perplexity of 1.
    let err = require_eval_targets(&s.samples, "heldout.jsonl").unwrap_err().to_string();
    assert!(err.contains("heldout.jsonl") && err.contains("none of the 3 held-out examples"), "{err}");

    // Without the limit they train.
    let s = load(&long, EncodeOptions::default());
    assert_eq!(s.without_targets, 0);
    assert!(s.require_targets("qa.jsonl", None).is_ok() && s.warning("qa.jsonl").is_none());
    assert!(require_eval_targets(&s.samples, "heldout.jsonl").is_ok());

    // Some cut, some not: trained, with a warning that counts them.
    let s = load(&completions(&[1, 50, 1]), cut(32));
    assert_eq!((s.without_targets, s.lost_to_max_len), (1, 1));
    assert!(s.require_targets("qa.jsonl", Some(32)).is_ok());
    let w = s.warning("qa.jsonl").expect("a warning");
    assert!(w.contains("1 of 3 examples have no token the loss counts (1 lost their completion to max_len)"), "{w}");

    // Masked, not cut: a chat with no assistant turn trains on nothing.
    let chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi there\"}]}\n";
    let s = load(chat, EncodeOptions::default());
    let err = s.require_targets("chat.jsonl", None).unwrap_err().to_string();
    assert!(err.contains("chat.jsonl") && err.contains("every label of the 1 examples is masked"), "{err}");
}

#[test]
fn a_chat_template_that_loops_runs_out_of_fuel() {
    // 10^10 loop turns: without a limit this never ends.
    let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}";
    let template = ChatTemplate::new(endless, None, None, "model.gguf").unwrap();
    let started = std::time::Instant::now();
    let err = template.render(&[Message { role: "user".into(), content: "Hi".into() }], false).err().expect("stopped").to_string();
    assert!(err.contains("model.gguf") && err.contains("chat template failed") && err.contains("fuel"), "{err}");
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
    // A real conversation of 200 turns renders well within the limit.
    let fixture = ChatTemplate::open(&chat_dir()).unwrap().unwrap();
    let long: Vec<Message> = (0..200).map(|i| Message { role: if i % 2 == 0 { "user" } else { "assistant" }.into(), content: format!("turn {i}") }).collect();
    assert!(fixture.render(&long, true).unwrap().text.contains("turn 199"));
}

/// Fuel bounds steps, not what they write: a template that writes a kB per turn of a long loop
/// stops at 64 MiB of text with an error saying so, instead of filling memory.
#[test]
fn a_chat_template_that_writes_without_end_stops_at_the_limit() {
    // A long message, so that the conversation's fuel would pay for far more than 64 MiB.
    let flood = "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content }}{% endfor %}{% endfor %}";
    let template = ChatTemplate::new(flood, None, None, "model.gguf").unwrap();
    let err = template.render(&[Message { role: "user".into(), content: "x".repeat(8 << 20) }], false).err().expect("stopped").to_string();
    assert!(err.contains("model.gguf") && err.contains("more than 64 MiB"), "{err}");
}

/// Fuel is given in proportion to the conversation: a long one renders, and a template cannot
/// make a short one cost seconds and gigabytes (a list of millions of items turned into text,
/// as a fuzzed template did within a fixed fuel).
#[test]
fn a_chat_templates_fuel_follows_the_conversations_size() {
    let fixture = ChatTemplate::open(&chat_dir()).unwrap().unwrap();
    let long: Vec<Message> =
        (0..4000).map(|i| Message { role: if i % 2 == 0 { "user" } else { "assistant" }.into(), content: format!("turn {i} {}", "y".repeat(2000)) }).collect();
    let text = fixture.render(&long, true).unwrap().text;
    assert!(text.len() > 8_000_000 && text.contains("turn 3999"), "{}", text.len());

    let items = "{{ 'n' ~ (['item'] * (messages|length * 6666666)) }}";
    let template = ChatTemplate::new(items, None, None, "model.gguf").unwrap();
    let err = template.render(&[Message { role: "user".into(), content: "Hi".into() }], false).err().expect("stopped").to_string();
    assert!(err.contains("model.gguf") && err.contains("fuel"), "{err}");
}
