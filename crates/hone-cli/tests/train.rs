//! `hone train` and `hone eval` from the command line: settings from TOML with flags on top,
//! bad data named by file:line or skipped and counted, outputs written whole or not at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn hone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hone")).args(args).output().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hone-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_data(dir: &Path, bad_line: bool) -> PathBuf {
    let mut lines: Vec<String> = (0..12).map(|i| format!("{{\"prompt\": \"Q{i}: {i}+{i}?\", \"completion\": \" {}\"}}", 2 * i)).collect();
    if bad_line {
        lines.insert(3, "{\"prompt\": \"no completion\"".to_string());
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn config_file_and_flags_train_an_adapter() {
    let dir = tmp("toml");
    let data = write_data(&dir, false);
    let out = dir.join("adapter");
    let config = dir.join("run.toml");
    std::fs::write(&config, format!("model = {:?}\ndata = {:?}\nrank = 4\nalpha = 8.0\nsteps = 3\nlr = 0.005\nbatch_size = 4\ntargets = \"q_proj,v_proj\"\n", fixtures().join("llama"), data)).unwrap();
    // --rank on the command line overrides the file's.
    let r = hone(&["train", "--config", s(&config), "--rank", "2", "--out", s(&out), "--quiet", "--eval-split", "0.25"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("step 3/3") && stderr.contains("eval loss"), "{stderr}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert!(!dir.join("adapter.checkpoint").exists());

    // The adapter evaluates better than the base on what it was trained on.
    let base = hone(&["eval", "--model", s(&fixtures().join("llama")), "--data", s(&data), "--nf4", "--json"]);
    let tuned = hone(&["eval", "--model", s(&fixtures().join("llama")), "--adapter", s(&out), "--data", s(&data), "--nf4", "--json"]);
    let loss = |o: &Output| -> f64 {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["perplexity"].as_f64().unwrap() > 1.0 && v["tokens"].as_u64().unwrap() > 0);
        v["loss"].as_f64().unwrap()
    };
    assert!(loss(&tuned) < loss(&base));

    // An existing output is never overwritten.
    let again = hone(&["train", "--config", s(&config), "--out", s(&out), "--quiet"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_lines_are_named_or_skipped_and_nothing_is_half_written() {
    let dir = tmp("bad");
    let data = write_data(&dir, true);
    let out = dir.join("adapter");
    let model = fixtures().join("llama");
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--steps", "1", "--quiet"]);
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("data.jsonl:4"), "{stderr}");
    assert!(!out.exists(), "no adapter directory after a failed run");

    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--steps", "1", "--quiet", "--skip-bad-lines", "--rank", "2"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("1 bad lines skipped"));
    assert!(out.join("adapter_model.safetensors").exists());

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let r = hone(&["train", "--model", s(&model), "--data", s(&empty), "--out", s(&dir.join("x")), "--quiet"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("empty dataset"));
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&dir.join("y")), "--format", "chat", "--skip-bad-lines", "--quiet"]);
    assert!(!r.status.success(), "completion data read as chat has no usable line");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn packing_token_budget_and_checkpointing_flags() {
    let dir = tmp("packing");
    let data = write_data(&dir, false);
    let out = dir.join("adapter");
    let model = fixtures().join("llama");
    // 12 short samples packed into rows of 48 tokens, two rows (96 tokens) per micro-batch.
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--quiet", "--rank", "2", "--epochs", "1",
        "--packing", "--max-len", "48", "--max-batch-tokens", "96", "--checkpointing", "off"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    // Unpacked, batch 4: three steps; packed, fewer rows and so fewer steps.
    let steps: usize = stderr.lines().filter(|l| l.starts_with("step ") && l.contains("loss")).count();
    assert!((1..3).contains(&steps), "{steps} steps:\n{stderr}");
    assert!(out.join("adapter_model.safetensors").exists());

    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&dir.join("x")), "--checkpointing", "sometimes"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains("checkpointing") && stderr.contains("expected on or off"), "{stderr}");
    assert!(!dir.join("x").exists());
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_loading() {
    let dir = tmp("fit");
    let data = write_data(&dir, false);
    let out = dir.join("adapter");
    let r = hone(&["train", "--model", s(&fixtures().join("llama")), "--data", s(&data), "--out", s(&out), "--batch-size", "100000000", "--checkpointing", "off"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{stderr}");
    assert!(stderr.contains("this run needs about") && stderr.contains("short by") && stderr.contains("--batch-size"), "{stderr}");
    assert!(!out.exists());
}
