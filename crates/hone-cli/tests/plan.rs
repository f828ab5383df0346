//! `hone plan` on the real default model (SmolLM2-135M, read from the GGUF header only): its
//! LoRA count must be what PEFT reports for r=16 on all linear layers
//! (`print_trainable_parameters`: 4,884,480), and a bad model path is a clear error. Plans for
//! the committed configs of Llama-3-8B/70B, Phi-3-mini and Mistral-7B, and plans against the
//! peak memory of real runs.

use std::process::Command;

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

#[test]
fn plan_counts_peft_trainable_parameters_for_smollm2() {
    // No --model: the default model (HONE_DEFAULT_MODEL, set by `cargo xtask test`, or the cache).
    let out = hone().args(["plan", "--rank", "16", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["lora_params"], 4_884_480);
    assert_eq!(v["lora_bytes"], 4_884_480u64 * 16);
    // With checkpointing (the default) the loss takes 21 positions of the 4 rows at a time
    // (chunked cross-entropy: 4M logits, 4M / (4 × 49152) = 21), and the tied 49152 × 576
    // embedding is split into parts that fit the device if it must be, so the largest buffer
    // that cannot be split is one piece of logits ...
    assert_eq!(v["largest_buffer"], "logits");
    assert_eq!(v["largest_buffer_bytes"], 4u64 * 21 * 49152 * 4);
    // DPO trains two sequences per pair: its plan for 2 pairs is SFT's for 4 sequences.
    let dpo = hone().args(["plan", "--rank", "16", "--json", "--method", "dpo", "--batch-size", "2"]).output().unwrap();
    assert!(dpo.status.success(), "{}", String::from_utf8_lossy(&dpo.stderr));
    let dpo: serde_json::Value = serde_json::from_slice(&dpo.stdout).unwrap();
    assert_eq!(dpo["total_bytes"], v["total_bytes"]);
    // Data parallelism, 2 peers per process on 2 nodes: each process holds the frozen weights
    // once and two peers' training state; every peer sends its gradients (and the loss), f32;
    // peer 0 receives the other three's.
    let dp = hone().args(["plan", "--rank", "16", "--json", "--data-parallel", "2", "--nodes", "2"]).output().unwrap();
    assert!(dp.status.success(), "{}", String::from_utf8_lossy(&dp.stderr));
    let dp: serde_json::Value = serde_json::from_slice(&dp.stdout).unwrap();
    let (d, u) = (&dp["data_parallel"], |k: &str| v[k].as_u64().unwrap());
    assert_eq!(d["peers"], 4);
    assert_eq!(d["all_reduce_bytes"], 4 * (4_884_480u64 + 1));
    assert_eq!(d["hub_bytes"], 3 * 4 * (4_884_480u64 + 1));
    assert_eq!(d["per_peer_bytes"], v["total_bytes"]);
    assert_eq!(d["per_node_bytes"].as_u64().unwrap(), u("total_bytes") + u("lora_bytes") + u("activation_bytes") + u("logits_bytes"));
    // ... and without it, the full f32 logits of batch 4 × 512.
    let out = hone().args(["plan", "--rank", "16", "--json", "--checkpointing", "off"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["largest_buffer"], "logits");
    assert_eq!(v["largest_buffer_bytes"], 4u64 * 512 * 49152 * 4);
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let out = hone().arg("plan").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The committed config.json files of real models: every plan is made, its parts add up, and
/// its LoRA count is PEFT's.
#[test]
fn plans_for_real_configs_and_70b_on_one_80gb_gpu() {
    let configs = fixtures().join("configs");
    for (name, lora_params) in [
        ("Meta-Llama-3-8B", 41_943_040u64),
        ("Meta-Llama-3-70B", 207_093_760),
        ("Phi-3-mini-4k-instruct", 25_165_824),
        ("Mistral-7B-v0.1", 41_943_040),
    ] {
        let path = configs.join(format!("{name}.json"));
        let v = plan_json(&["--model", path.to_str().unwrap(), "--batch-size", "1", "--max-len", "512"]);
        let total = v["total_bytes"].as_u64().unwrap();
        println!("{name}: QLoRA r=16 all-linear, 1 × 512 tokens: {:.2} GB ({v})", total as f64 / 1e9);
        assert_eq!(v["lora_params"], lora_params, "{name}: PEFT's count for r=16 all-linear");
        let parts = ["nf4_codes_bytes", "nf4_stats_bytes", "dense_bytes", "lora_bytes", "activation_bytes", "logits_bytes", "workspace_bytes"];
        assert_eq!(parts.iter().map(|k| v[k].as_u64().unwrap()).sum::<u64>(), total, "{name}: the parts add up");
        if name == "Meta-Llama-3-70B" {
            // 70.6B params in its linears at 4 bits.
            assert_eq!(v["nf4_codes_bytes"].as_u64().unwrap(), 4 * 68_451_041_280u64.div_ceil(8));
        }
    }
}

/// The headline sizes fit where hone says they do (r=16 all-linear, 1 × 512, checkpointing on):
/// Llama-3-8B in 7.5 GB of GPU memory (8.0 GB on the CPU backend), Llama-3-70B on one 48 GB GPU
/// with room to spare (46 GB), as the QLoRA paper fine-tuned 65B: 4-bit codes, 8-bit absmax,
/// bf16 embeddings and head, no dense workspace; Phi-3-mini in 3.3 GB on either. (Issue 16 asks
/// 3.0 GB for Phi-3-mini on a GPU: its plan is 3.22 GB with f32 moments, 3.07 GB with 8-bit
/// AdamW, of which 0.48 GB are activations; see the closing note.) 8-bit AdamW keeps a quarter
/// of the moments' room.
#[test]
fn plans_meet_the_headline_goals() {
    let configs = fixtures().join("configs");
    for (name, gpu_goal, cpu_goal) in [("Phi-3-mini-4k-instruct", 3.3e9, Some(3.3e9)), ("Meta-Llama-3-8B", 7.5e9, Some(8.0e9)), ("Meta-Llama-3-70B", 46e9, None)] {
        let path = configs.join(format!("{name}.json"));
        for (backend, goal) in [("cuda", Some(gpu_goal)), ("cpu", cpu_goal)] {
            let Some(goal) = goal else { continue };
            let v = plan_json(&["--model", path.to_str().unwrap(), "--batch-size", "1", "--max-len", "512", "--backend", backend]);
            let total = v["total_bytes"].as_f64().unwrap();
            println!("{name} on {backend}: {:.2} GB (goal {:.1} GB)", total / 1e9, goal / 1e9);
            assert!(total <= goal, "{name} on {backend}: planned {total} bytes, goal {goal}");
            let v8 = plan_json(&["--model", path.to_str().unwrap(), "--batch-size", "1", "--max-len", "512", "--backend", backend, "--optim", "adamw_8bit"]);
            let (m32, m8) = (v["optimizer_bytes"].as_f64().unwrap(), v8["optimizer_bytes"].as_f64().unwrap());
            println!("{name} on {backend} with 8-bit AdamW: {:.2} GB (moments {:.1} MB, f32 {:.1} MB)", v8["total_bytes"].as_f64().unwrap() / 1e9, m8 / 1e6, m32 / 1e6);
            // 2 bytes per value and 8 per block of 256, against 8 per value.
            assert!((m8 / m32 - (2.0 + 8.0 / 256.0) / 8.0).abs() < 1e-3, "{name}: 8-bit moments {m8} vs f32 {m32}");
            assert_eq!(v8["total_bytes"].as_f64().unwrap(), total - (m32 - m8));
            // Issue 16's 3.0 GB for Phi-3-mini on a GPU: met with 8-bit moments and the
            // embedding table in host memory (`host_table_bytes`, not device memory).
            if name.starts_with("Phi-3") && backend == "cuda" {
                let t8 = v8["total_bytes"].as_f64().unwrap();
                assert!(t8 <= 3.0e9, "{name} on {backend} with 8-bit AdamW: planned {t8} bytes, goal 3.0e9");
                assert!(v8["host_table_bytes"].as_f64().unwrap() > 0.0, "{name}: its untied embeddings stay in host memory");
            }
        }
    }
}

fn peak_and_plan(model: &str, batch: &str, len: &str, optim: &str, extra: &[&str]) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("hone-plan-{}-{batch}-{len}-{optim}-{}", std::process::id(), extra.join("")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Long texts, so that every sample is cut to exactly --max-len tokens.
    let para = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. ".repeat(40);
    let lines: Vec<String> = (0..8).map(|i| serde_json::json!({"text": format!("Story {i}. {para}")}).to_string()).collect();
    std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
    let out = hone()
        .args(["train", "--model", model, "--data", dir.join("data.jsonl").to_str().unwrap(), "--out", dir.join("adapter").to_str().unwrap()])
        // Two steps: the optimizer's moments exist from the first update on, so the second
        // step's peak is the one every later step reaches.
        .args(["--steps", "2", "--batch-size", batch, "--max-len", len, "--backend", "cpu", "--optim", optim, "--quiet"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let bytes = |prefix: &str| -> f64 {
        let line = err.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line in:\n{err}"));
        line.split(" bytes").next().and_then(|r| r.rsplit('(').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    let _ = std::fs::remove_dir_all(&dir);
    (bytes("peak memory"), bytes("plan:"))
}

/// What `hone train` plans before it starts is within 10% of the peak RSS it then reaches, on
/// the runs this machine can measure: the tiny fixture and SmolLM2 on the CPU backend, SmolLM2
/// also with 8-bit AdamW, with DoRA, and as 2 data-parallel peers in one process.
#[test]
fn plan_is_within_ten_percent_of_measured_peak_memory() {
    let tiny = fixtures().join("llama");
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| "/tmp".into());
    let smollm2 = std::env::var_os("HONE_DEFAULT_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| home.join(".cache/hone/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(smollm2.exists(), "{} is missing: run `cargo xtask default-model` (cargo xtask test does)", smollm2.display());
    let (tiny, smollm2) = (tiny.to_str().unwrap(), smollm2.to_str().unwrap());
    for (model, batch, len, optim, extra) in
        [(tiny, "4", "64", "adamw", &[][..]), (smollm2, "2", "128", "adamw", &[]), (smollm2, "2", "128", "adamw_8bit", &[]), (smollm2, "2", "128", "adamw", &["--dora"]), (smollm2, "2", "128", "adamw", &["--data-parallel", "2"])]
    {
        let (peak, plan) = peak_and_plan(model, batch, len, optim, extra);
        let err = (plan - peak) / peak;
        println!("{model} batch {batch} × {len}, {optim} {extra:?}: planned {:.1} MB, measured peak RSS {:.1} MB ({:+.1}%)", plan / 1e6, peak / 1e6, 100.0 * err);
        assert!(err.abs() < 0.10, "plan {plan} vs peak {peak}");
    }
}

#[test]
fn plan_of_a_missing_model_names_the_file() {
    let out = hone().args(["plan", "--model", "/nonexistent/model"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model: no such file or directory"), "{err}");
}

/// Layers split over GPUs of one host: by a per-device limit, or balanced; a limit the model
/// does not fit is refused with the shortfall, and the CPU backend has no device map.
#[test]
fn plan_prints_a_device_map_for_several_gpus() {
    let model = fixtures().join("configs/Meta-Llama-3-70B.json");
    let model = model.to_str().unwrap();
    let out = hone().args(["plan", "--model", model, "--batch-size", "1", "--devices", "2", "--max-memory", "40GB"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success());
    let line = |d: &str| text.lines().find(|l| l.trim_start().starts_with(d)).unwrap_or_else(|| panic!("no {d} line in:\n{text}")).to_string();
    assert!(line("device 0:").contains("layers 0..="), "{text}");
    assert!(line("device 1:").contains("..=79, norm and head"), "{text}");

    let out = hone().args(["plan", "--model", model, "--batch-size", "1", "--devices", "4"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("device 3:"), "{text}");

    let out = hone().args(["plan", "--model", model, "--batch-size", "1", "--max-memory", "40GB"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("short") && err.contains("does not fit 1 device"), "{err}");

    let out = hone().args(["plan", "--model", model, "--devices", "2", "--backend", "cpu"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--backend cuda or wgpu"));
}
