//! `hone compare` on the tiny Llama fixture with a chat template: its losses are `hone eval`'s,
//! its replies `hone generate`'s, its means the means of its per-reply scores, the blind key a
//! permutation, and the HTML self-contained.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn hone(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_hone")).args(args).output().unwrap();
    assert!(o.status.success(), "hone {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Llama fixture's weights with the chat fixture's tokenizer and template.
fn chat_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for (from, name) in [("llama", "config.json"), ("llama", "model.safetensors"), ("chat", "tokenizer.json"), ("chat", "tokenizer_config.json")] {
        std::fs::copy(fixtures().join(from).join(name), m.join(name)).unwrap();
    }
    m
}

fn eval_loss(model: &Path, data: &Path, adapter: Option<&Path>) -> f64 {
    let mut args = vec!["eval", "--model", s(model), "--data", s(data), "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let v: serde_json::Value = serde_json::from_slice(&hone(&args).stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn compare_agrees_with_eval_and_generate_and_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("hone-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = chat_model(&dir);
    let rows: Vec<String> = ["Say hi", "Name a colour", "Count to three", "What is 2+2?", "Greet me"]
        .iter()
        .zip(["Ahoy! Hi.", "Ahoy! Red.", "Ahoy! One, two, three.", "Ahoy! 4.", "Ahoy! Hello there."])
        .map(|(q, a)| serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string())
        .collect();
    let data = dir.join("heldout.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let adapter = dir.join("ahoy");
    hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&adapter), "--steps", "6", "--rank", "4", "--lr", "0.05", "--quiet"]);

    // A second adapter on fewer layers, with DoRA: compare loads the base once, so what the first
    // adapter left on a layer the second does not adapt would show in the second's loss.
    let second = dir.join("dora-qv");
    hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&second), "--steps", "4", "--rank", "2", "--targets", "q_proj,v_proj", "--dora", "--lr", "0.05", "--quiet"]);

    let out = dir.join("report");
    let printed = hone(&["compare", "--model", s(&model), "--adapter", s(&adapter), "--adapter", s(&second), "--data", s(&data), "--out", s(&out), "--check", "regex:^Ahoy", "--check", "json", "--max-new-tokens", "6", "--blind", "--seed", "3", "--gen-batch-size", "3"]);
    let table = String::from_utf8(printed.stdout).unwrap();
    assert!(table.contains("| held-out loss |") && table.contains("check regex:^Ahoy"), "{table}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants.iter().map(|v| v["name"].as_str().unwrap()).collect::<Vec<_>>(), ["base", "ahoy", "dora-qv"]);
    assert_eq!(report["checks"], serde_json::json!(["regex:^Ahoy", "json"]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);

    // The held-out losses are `hone eval`'s.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    assert!(close(variants[0]["loss"].as_f64().unwrap(), eval_loss(&model, &data, None)));
    assert!(close(variants[1]["loss"].as_f64().unwrap(), eval_loss(&model, &data, Some(&adapter))));
    assert!(close(variants[2]["loss"].as_f64().unwrap(), eval_loss(&model, &data, Some(&second))));

    // The replies are `hone generate`'s (greedy, the same template and stop tokens).
    for (column, adapter) in [(0, None), (1, Some(&adapter)), (2, Some(&second))] {
        let mut args = vec!["generate", "--model", s(&model), "--prompts", s(&data), "--max-new-tokens", "6"];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let generated = String::from_utf8(hone(&args).stdout).unwrap();
        let replies: Vec<String> = generated.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reply"].as_str().unwrap().to_string()).collect();
        let ours: Vec<&str> = rows.iter().map(|r| r["replies"][column].as_str().unwrap()).collect();
        assert_eq!(ours, replies, "column {column}");
    }

    // Each mean is the mean of the per-reply scores, and each score is hone::score's.
    for v in variants {
        let scores = v["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 5);
        for key in ["exact_match", "contains", "token_f1", "rouge_l"] {
            let mean = scores.iter().map(|s| s[key].as_f64().unwrap()).sum::<f64>() / 5.0;
            assert!(close(v[key].as_f64().unwrap(), mean), "{key}");
        }
        let column = variants.iter().position(|w| w["name"] == v["name"]).unwrap();
        for (row, sc) in rows.iter().zip(scores) {
            let (reply, reference) = (row["replies"][column].as_str().unwrap(), row["reference"].as_str().unwrap());
            assert!(close(sc["token_f1"].as_f64().unwrap(), hone::score::token_f1(reply, reference)));
            assert_eq!(sc["checks"][0].as_f64().unwrap() == 1.0, reply.starts_with("Ahoy"));
        }
        assert!(v["general_perplexity"].as_f64().unwrap() > 1.0);
    }

    // The HTML is self-contained: no script, nothing fetched.
    for page in ["report.html", "review.html"] {
        let html = std::fs::read_to_string(out.join(page)).unwrap();
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="), "{page}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Say hi"));

    // The blind key maps each row's letters to a permutation of the models.
    let key: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("review-key.json")).unwrap()).unwrap();
    let key = key.as_array().unwrap();
    assert_eq!(key.len(), 5);
    for k in key {
        let mut names: Vec<&str> = k["columns"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["ahoy", "base", "dora-qv"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_check_is_refused_by_name() {
    let o = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["compare", "--model", s(&fixtures().join("llama")), "--data", s(&fixtures().join("tables/completion.csv")), "--check", "regex:(", "--out"])
        .arg(std::env::temp_dir().join("hone-compare-bad"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--check") && e.contains("regex:("), "{e}");
}
