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

/// The tiny Llama with the chat fixture's tokenizer files (the same tokenizer, plus the EOS
/// token and chat template that preference pairs need).
fn llama_with_template(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for (from, name) in [("llama", "config.json"), ("llama", "model.safetensors"), ("chat", "tokenizer.json"), ("chat", "tokenizer_config.json")] {
        std::fs::copy(fixtures().join(from).join(name), model.join(name)).unwrap();
    }
    model
}

fn tensors(path: &Path) -> hone::io::safetensors::SafeTensors {
    hone::io::safetensors::SafeTensors::open(Box::new(hone::io::FileSource::open(path).unwrap())).unwrap()
}

/// A preference run on the command line as the fixtures' TRL runs (make_preference_fixtures.py,
/// make_orpo_fixtures.py): 3 steps from the given adapter, full batch of the 3 text pairs,
/// constant lr 5e-3, clipping at 1, β 0.1. Returns the model dir, the data, the pairs' JSON
/// lines and the run's stderr; asserts the adapter equals TRL's (`fixture`) within 1e-4.
fn preference_run(dir: &Path, method: &str, fixture: &str) -> (PathBuf, PathBuf, Vec<String>, String) {
    let model = llama_with_template(dir);
    let pairs: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("preference/dpo.json")).unwrap()).unwrap();
    let rows: Vec<String> = pairs["data"]["text"].as_array().unwrap().iter().map(|r| r.to_string()).collect();
    let data = dir.join("prefs.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let (start, out) = (fixtures().join("lora/llama_peft_adapter"), dir.join("adapter"));
    let r = hone(&[
        "train", "--model", s(&model), "--data", s(&data), "--method", method, "--adapter", s(&start), "--quantize", "none", "--lr", "0.005",
        "--schedule", "constant", "--batch-size", "3", "--steps", "3", "--seed", "0", "--out", s(&out), "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(r.status.success(), "{stderr}");
    let (ours, theirs) = (tensors(&out.join("adapter_model.safetensors")), tensors(&fixtures().join("preference").join(fixture)));
    let mut worst = 0f64;
    for name in theirs.tensors().keys() {
        let err = hone::parity::rel_error(&ours.read_f32(name).unwrap().1, &theirs.read_f32(name).unwrap().1);
        worst = worst.max(err);
        assert!(err < 1e-4, "{name}: {err:.3e}");
    }
    println!("hone train --method {method} vs TRL: worst rel error {worst:.2e} over {} tensors", theirs.tensors().len());
    assert_eq!(ours.tensors().len(), theirs.tensors().len());
    (model, data, rows, stderr)
}

#[test]
fn dpo_from_the_command_line_gives_trls_adapter_and_its_metrics() {
    let dir = tmp("dpo");
    let (model, data, rows, stderr) = preference_run(&dir, "dpo", "dpo_steps_adapter.safetensors");
    assert!(stderr.contains("step 3/3") && stderr.contains("margin") && stderr.contains("reference: log-probabilities of 3 pairs"), "{stderr}");
    let (out, start) = (dir.join("adapter"), fixtures().join("lora/llama_peft_adapter"));

    // `hone eval --method dpo`, against the base: the trained adapter prefers the chosen
    // completions by more than the one it started from.
    let margin = |adapter: &Path| -> f64 {
        let o = hone(&["eval", "--model", s(&model), "--adapter", s(adapter), "--data", s(&data), "--method", "dpo", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"] {
            assert!(v[key].as_f64().is_some_and(f64::is_finite), "{key} in {v}");
        }
        v["rewards/margins"].as_f64().unwrap()
    };
    let (trained, started) = (margin(&out), margin(&start));
    println!("rewards/margins against the base: started {started:.4}, trained {trained:.4}");
    assert!(trained > started + 0.1, "trained {trained} vs started {started}");

    // Bad pairs are named by file:line; DPO settings need --method dpo.
    std::fs::write(&data, format!("{}\n{{\"prompt\": \"x\", \"chosen\": \" y\"}}", rows[0])).unwrap();
    let bad = hone(&["train", "--model", s(&model), "--data", s(&data), "--method", "dpo", "--quantize", "none", "--out", s(&dir.join("bad")), "--quiet"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("prefs.jsonl:2") && stderr.contains("rejected"), "{stderr}");
    let sft = hone(&["train", "--model", s(&model), "--data", s(&data), "--beta", "0.2", "--out", s(&dir.join("sft")), "--quiet"]);
    assert!(!sft.status.success() && String::from_utf8_lossy(&sft.stderr).contains("--method dpo"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn orpo_from_the_command_line_gives_trls_adapter_and_its_metrics() {
    let dir = tmp("orpo");
    let (model, data, _, stderr) = preference_run(&dir, "orpo", "orpo_steps_adapter.safetensors");
    assert!(stderr.contains("step 3/3") && stderr.contains("(nll ") && stderr.contains("margin") && !stderr.contains("reference:"), "{stderr}");
    let (out, start) = (dir.join("adapter"), fixtures().join("lora/llama_peft_adapter"));

    // `hone eval --method orpo`: TRL's metrics and ORPO's three; training lowered the loss.
    let eval = |adapter: &Path| -> serde_json::Value {
        let o = hone(&["eval", "--model", s(&model), "--adapter", s(adapter), "--data", s(&data), "--method", "orpo", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (trained, started) = (eval(&out), eval(&start));
    for key in ["loss", "rewards/chosen", "rewards/margins", "logps/chosen", "nll_loss", "log_odds_ratio", "log_odds_chosen"] {
        assert!(trained[key].as_f64().is_some_and(f64::is_finite), "{key} in {trained}");
    }
    let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
    println!("ORPO loss on the pairs: started {:.4}, trained {:.4}", loss(&started), loss(&trained));
    assert!(loss(&trained) < loss(&started) - 0.1, "{trained} vs {started}");
    // TRL's step-1 loss is the starting adapter's loss on the same batch.
    let want = fixture_orpo()["train"]["losses"][0].as_f64().unwrap();
    assert!((loss(&started) - want).abs() < 1e-4 * want, "started {} vs TRL's first step {want}", loss(&started));

    let both = hone(&["train", "--model", s(&model), "--data", s(&data), "--method", "orpo", "--loss-type", "ipo", "--out", s(&dir.join("x")), "--quiet"]);
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("drop --loss-type"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn fixture_orpo() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("preference/orpo.json")).unwrap()).unwrap()
}

#[test]
fn data_whose_completions_are_all_cut_away_is_refused_not_scored_as_zero() {
    let dir = tmp("cut");
    let data = write_data(&dir, false);
    let llama = fixtures().join("llama");
    let out = dir.join("adapter");
    // Every prompt fills --max-len 3: nothing is left to score or train on.
    let eval = hone(&["eval", "--model", s(&llama), "--data", s(&data), "--max-len", "3", "--json"]);
    let train = hone(&["train", "--model", s(&llama), "--data", s(&data), "--out", s(&out), "--max-len", "3", "--steps", "1", "--quiet"]);
    for r in [&eval, &train] {
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && r.stdout.is_empty(), "{stderr}");
        assert!(stderr.contains("data.jsonl") && stderr.contains("12 of 12 lost their completion to max_len 3"), "{stderr}");
    }
    assert!(!out.exists());
    // With room for the completions the same data is scored.
    let ok = hone(&["eval", "--model", s(&llama), "--data", s(&data), "--max-len", "64", "--json"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(v["tokens"].as_u64().unwrap() > 0 && v["perplexity"].as_f64().unwrap() > 1.0, "{v}");
}

#[test]
fn pissa_init_trains_on_the_residual_and_saves_a_rank_2r_lora_of_the_original_base() {
    let dir = tmp("pissa");
    let data = write_data(&dir, false);
    let out = dir.join("adapter");
    let model = fixtures().join("llama");
    // QLoRA (the default): the residual is what gets quantized.
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--steps", "2", "--quiet", "--rank", "2", "--alpha", "4", "--init", "pissa"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("PiSSA: 14 layers"), "{stderr}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["init_lora_weights"].as_bool()), (Some(4), Some(8.0), Some(true)), "{cfg}");
    let a = hone::lora::peft::Adapter::read(&hone::io::Dir(out.clone())).unwrap();
    assert!(a.layers.iter().all(|l| l.a_shape[0] == 4 && l.b_shape[1] == 4));

    // What PiSSA cannot start from, and what it does not combine with, by name.
    let gguf = dir.join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    for (args, said) in [
        (vec!["--model", s(&gguf)], "original 16/32-bit weights"),
        (vec!["--model", s(&model), "--adapter", s(&out)], "--adapter"),
        (vec!["--model", s(&model), "--dora"], "--dora"),
    ] {
        let r = hone(&[&["train", "--data", s(&data), "--out", s(&dir.join("no")), "--quiet", "--init", "pissa"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && stderr.contains(said), "{args:?}: {stderr}");
    }
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&dir.join("no")), "--quiet", "--init", "loft"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("expected default, pissa or loftq"));
    assert!(!dir.join("no").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loftq_init_starts_from_the_nf4_error_and_saves_a_plain_lora() {
    let dir = tmp("loftq");
    let data = write_data(&dir, false);
    let out = dir.join("adapter");
    let model = fixtures().join("llama");
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--steps", "2", "--quiet", "--rank", "2", "--alpha", "4", "--init", "loftq"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("LoftQ: 14 layers") && stderr.contains("with the initial adapter"), "{stderr}");
    assert!(stderr.contains("not divided by the scale alpha/r = 2"), "alpha 4 over rank 2 is told: {stderr}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["init_lora_weights"].as_bool()), (Some(2), Some(4.0), Some(true)), "{cfg}");
    // No quantization leaves no error to start from.
    let r = hone(&["train", "--model", s(&model), "--data", s(&data), "--out", s(&dir.join("no")), "--quiet", "--init", "loftq", "--quantize", "none"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains("--quantize nf4"), "{stderr}");
    assert!(!dir.join("no").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn csv_and_parquet_datasets_train_with_columns_renamed() {
    let dir = tmp("tables");
    let model = fixtures().join("llama");
    let csv = fixtures().join("tables/renamed.csv");
    let r = hone(&["train", "--model", s(&model), "--data", s(&csv), "--columns", "prompt=question,completion=answer", "--out", s(&dir.join("a")), "--steps", "1", "--rank", "2", "--quiet"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Without the mapping the rows have no format hone knows: named by file and line.
    let r = hone(&["train", "--model", s(&model), "--data", s(&csv), "--out", s(&dir.join("b")), "--steps", "1", "--quiet"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains("renamed.csv:2"), "{stderr}");
    let parquet = fixtures().join("tables/completion.parquet");
    let r = hone(&["train", "--model", s(&model), "--data", s(&parquet), "--out", s(&dir.join("c")), "--steps", "1", "--rank", "2", "--quiet"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn data_parallel_peers_train_the_adapter_of_one_run_with_their_joint_batch() {
    let dir = tmp("data-parallel");
    let data = write_data(&dir, false);
    let llama = fixtures().join("llama");
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec!["train", "--model", s(&llama), "--data", s(&data), "--out", s(&out), "--rank", "4", "--alpha", "8", "--steps", "4", "--lr", "0.01", "--dropout", "0", "--quiet"];
        args.extend(extra);
        let r = hone(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        out
    };
    let alone = run("alone", &["--batch-size", "4"]);
    let two = run("two", &["--batch-size", "2", "--data-parallel", "2"]);
    let four = run("four", &["--batch-size", "1", "--data-parallel", "4"]);
    let (a, b, c) = (tensors(&alone.join("adapter_model.safetensors")), tensors(&two.join("adapter_model.safetensors")), tensors(&four.join("adapter_model.safetensors")));
    let mut moved = false;
    for name in a.tensors().keys().cloned().collect::<Vec<_>>() {
        let (_, x) = a.read_f32(&name).unwrap();
        moved |= name.contains("lora_B") && x.iter().any(|&v| v != 0.0);
        for (peers, other) in [(2, &b), (4, &c)] {
            let (_, y) = other.read_f32(&name).unwrap();
            let err = hone::parity::rel_error(&y, &x);
            assert!(err < 1e-5, "{peers} peers: {name}: {err:.3e}");
        }
    }
    assert!(moved, "the adapter trained");
    // A preference run is refused by name.
    let r = hone(&["train", "--model", s(&llama), "--data", s(&data), "--out", s(&dir.join("dpo")), "--method", "dpo", "--data-parallel", "2", "--quiet"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("--data-parallel is for SFT runs"), "{}", String::from_utf8_lossy(&r.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
