//! `cargo xtask bench`: hone against its peer on the same model, data and settings, in one run,
//! alternating, after a warm-up, printing medians and ratios (hone / peer).
//!
//! Peer: PyTorch + PEFT + bitsandbytes on the CPU (bench/peft_qlora.py; the Python from
//! `HONE_REF_PYTHON`, default /opt/hone-ref/bin/python, with tests/reference/requirements.txt).
//! Peak memory is the process's VmHWM, sampled from /proc for both sides alike.

use crate::{cargo, root, run, target_dir, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    load_s: f64,
    tokens_per_s: f64,
    peak_rss_mb: f64,
    generate_tokens_per_s: f64,
}

/// Runs `cmd`, sampling its peak RSS; returns (stdout, stderr, peak MB).
fn measured(cmd: &mut Command) -> Result<(String, String, f64)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0f64;
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = text.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()) {
                peak_kb = peak_kb.max(kb);
            }
        }
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let (stdout, stderr) = (out_t.join().unwrap_or_default(), err_t.join().unwrap_or_default());
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}\n{}", stderr.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")));
    }
    Ok((stdout, stderr, peak_kb / 1024.0))
}

struct Case {
    name: &'static str,
    model: PathBuf,
    steps: usize,
    batch: usize,
    max_len: usize,
    rank: usize,
}

fn hone_run(case: &Case, data: &Path, threads: usize) -> Result<Sample> {
    let out = target_dir().join("bench/hone-adapter");
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new(hone_bin());
    // The peer's settings: no activation checkpointing (PEFT's default; hone's is on, trading
    // one more forward pass for memory), no dropout, clipping at 1.
    c.args(["train", "--quiet", "--format", "text", "--dropout", "0", "--max-grad-norm", "1", "--checkpointing", "off"])
        .arg("--model")
        .arg(&case.model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&out)
        .args(["--steps", &case.steps.to_string(), "--batch-size", &case.batch.to_string(), "--max-len", &case.max_len.to_string()])
        .args(["--rank", &case.rank.to_string(), "--alpha", &(2 * case.rank).to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string());
    let (_, stderr, peak) = measured(&mut c)?;
    let load_s = stderr.lines().find_map(|l| l.split(" loaded in ").nth(1)).and_then(|v| v.split('s').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let tokens_per_s = throughput(&stderr)?;
    Ok(Sample { load_s, tokens_per_s, peak_rss_mb: peak, generate_tokens_per_s: f64::NAN })
}

fn peer_run(case: &Case, data: &Path, threads: usize, python: &str) -> Result<Sample> {
    let mut c = Command::new(python);
    c.arg(root().join("bench/peft_qlora.py"))
        .arg("--model")
        .arg(&case.model)
        .arg("--data")
        .arg(data)
        .args(["--steps", &case.steps.to_string(), "--batch-size", &case.batch.to_string(), "--max-len", &case.max_len.to_string()])
        .args(["--rank", &case.rank.to_string(), "--alpha", &(2 * case.rank).to_string(), "--threads", &threads.to_string()]);
    let (stdout, _, peak) = measured(&mut c)?;
    let line = stdout.lines().last().unwrap_or("");
    let field = |k: &str| line.split(&format!("\"{k}\": ")).nth(1).and_then(|v| v.split([',', '}']).next()).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
    Ok(Sample { load_s: field("load_s"), tokens_per_s: field("train_tokens_per_s"), peak_rss_mb: peak, generate_tokens_per_s: f64::NAN })
}

/// Greedy generation of `tokens` new tokens (past any EOS) from a raw prompt on the f32 base.
const GEN_TOKENS: usize = 64;
const GEN_PROMPT: &str = "Tell me about the sea.";

fn hone_generate(case: &Case, tokens: usize, threads: usize) -> Result<f64> {
    let mut c = Command::new(hone_bin());
    c.args(["generate", "--raw", "--ignore-eos", "--prompt", GEN_PROMPT, "--max-new-tokens", &tokens.to_string()])
        .arg("--model")
        .arg(&case.model)
        .env("RAYON_NUM_THREADS", threads.to_string());
    let (_, stderr, _) = measured(&mut c)?;
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("generated ").and_then(|r| r.split(": ").nth(1)).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()))
        .ok_or_else(|| format!("hone printed no generation rate:\n{stderr}"))
}

fn peer_generate(case: &Case, tokens: usize, threads: usize, python: &str) -> Result<f64> {
    let mut c = Command::new(python);
    c.arg(root().join("bench/peft_qlora.py")).arg("--model").arg(&case.model).args(["--data", "-", "--generate", &tokens.to_string(), "--prompt", GEN_PROMPT, "--threads", &threads.to_string()]);
    let (stdout, _, _) = measured(&mut c)?;
    let line = stdout.lines().last().unwrap_or("");
    line.split("\"generate_tokens_per_s\": ").nth(1).and_then(|v| v.split([',', '}']).next()).and_then(|v| v.trim().parse().ok()).ok_or_else(|| format!("peer printed no generation rate: {line}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The demo chats as plain text, so both sides tokenize the same strings the same way.
fn bench_data() -> Result<PathBuf> {
    let out = target_dir().join("bench/ahoy_text.jsonl");
    std::fs::create_dir_all(out.parent().unwrap()).map_err(|e| e.to_string())?;
    let src = std::fs::read_to_string(root().join("data/demo/ahoy_train.jsonl")).map_err(|e| e.to_string())?;
    // The peer script reads plain text: each conversation becomes its turns joined by newlines.
    let mut lines = Vec::new();
    for (n, l) in src.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(l).map_err(|e| format!("data/demo/ahoy_train.jsonl line {}: {e}", n + 1))?;
        let turns = row["messages"].as_array().ok_or_else(|| format!("data/demo/ahoy_train.jsonl line {}: no \"messages\" list", n + 1))?;
        let text: Vec<&str> = turns.iter().filter_map(|t| t["content"].as_str()).collect();
        lines.push(serde_json::json!({ "text": text.join("\n") }).to_string());
    }
    std::fs::write(&out, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    Ok(out)
}

/// `cargo xtask bench [--reps N] [--case tiny|smollm2]`
pub fn bench(args: &[String]) -> Result {
    let reps: usize = args.iter().position(|a| a == "--reps").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(3);
    let only = args.iter().position(|a| a == "--case").and_then(|i| args.get(i + 1)).cloned();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let python = std::env::var("HONE_REF_PYTHON").unwrap_or_else(|_| "/opt/hone-ref/bin/python".into());
    run(cargo().args(["build", "--release", "-p", "hone-cli"]))?;
    let data = bench_data()?;
    // transformers cannot put bitsandbytes on a GGUF: both sides load the same f32 HF folder.
    let smollm2 = target_dir().join("bench/SmolLM2-135M-Instruct-hf");
    if !smollm2.join("config.json").exists() {
        run(Command::new(&python).arg(root().join("bench/peft_qlora.py")).arg("--model").arg(crate::default_model()?).arg("--data").arg(&data).arg("--export-hf").arg(&smollm2))?;
    }
    let cases = [
        Case { name: "tiny fixture (llama, 2 layers, hidden 64), QLoRA r=8", model: root().join("tests/fixtures/llama"), steps: 12, batch: 4, max_len: 64, rank: 8 },
        Case { name: "SmolLM2-135M QLoRA r=16 all-linear, seq <=256, batch 4", model: smollm2.clone(), steps: 6, batch: 4, max_len: 256, rank: 16 },
    ];
    let mut rows = Vec::new();
    for case in cases.iter().filter(|c| only.as_deref().is_none_or(|o| c.name.to_lowercase().contains(o))) {
        eprintln!("bench: {} — warm-up", case.name);
        hone_run(case, &data, threads)?;
        peer_run(case, &data, threads, &python)?;
        let (mut hone, mut peer) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            eprintln!("bench: {} — repetition {}/{reps}", case.name, rep + 1);
            let mut h = hone_run(case, &data, threads)?;
            h.generate_tokens_per_s = hone_generate(case, GEN_TOKENS, threads)?;
            hone.push(h);
            let mut p = peer_run(case, &data, threads, &python)?;
            p.generate_tokens_per_s = peer_generate(case, GEN_TOKENS, threads, &python)?;
            peer.push(p);
        }
        rows.push((case.name, hone, peer));
    }
    let mut table = String::from("| case | metric | hone | PyTorch+PEFT+bnb | hone / peer |\n|---|---|---|---|---|\n");
    let browser = if only.as_deref().is_none_or(|o| o == "browser") { Some(browser_vs_native(reps)?) } else { None };
    for (name, hone, peer) in &rows {
        let metrics: [(&str, fn(&Sample) -> f64); 4] = [
            ("train tokens/s", |s| s.tokens_per_s),
            ("peak RSS (MB)", |s| s.peak_rss_mb),
            ("load + quantize (s)", |s| s.load_s),
            ("greedy generation tokens/s (f32 base, 64 new)", |s| s.generate_tokens_per_s),
        ];
        for (metric, f) in metrics {
            let h = median(hone.iter().map(f).collect());
            let p = median(peer.iter().map(f).collect());
            table.push_str(&format!("| {name} | {metric} | {h:.2} | {p:.2} | {:.2}x |\n", h / p));
        }
    }
    if let Some((page, native, (raw, gz))) = browser {
        let (b, n) = (median(page), median(native));
        table.push_str(&format!(
            "\n| case | metric | browser (WebGPU, SwiftShader) | native wgpu (Vulkan, lavapipe) | browser step time / native |\n|---|---|---|---|---|\n| {BROWSER_CASE} | train tokens/s | {b:.2} | {n:.2} | {:.2}x |\n",
            n / b
        ));
        table.push_str(&format!("\nwasm module (release, wasm-opt -O2): {raw} bytes raw, {gz} bytes gzip -9 (target <= 10 MB gzip)\n"));
    }
    println!("\n{table}");
    println!("medians of {reps} alternating runs after a warm-up; {threads} threads each; hone = the release `hone` binary");
    let path = target_dir().join("bench/results.md");
    std::fs::write(&path, &table).map_err(|e| e.to_string())?;
    println!("bench: table written to {}", path.display());
    Ok(())
}

/// Training tokens/s after the first step, as `hone train` prints it.
fn throughput(stderr: &str) -> Result<f64> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("throughput after the first step: "))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("hone printed no throughput:\n{stderr}"))
}

fn hone_bin() -> PathBuf {
    target_dir().join("release/hone")
}

const BROWSER_CASE: &str = "tiny SmolLM2-shaped fixture, QLoRA r=4, batch 4 × ≤48, 8 steps";

/// The same training run in headless Chromium (the release page, WebGPU on SwiftShader) and
/// natively on wgpu (lavapipe, a CPU Vulkan) on this machine: tokens/s after the first step,
/// alternating, `reps` times after a warm-up of each.
/// Also returns the release module's size (raw, gzip -9).
fn browser_vs_native(reps: usize) -> Result<(Vec<f64>, Vec<f64>, (u64, u64))> {
    let www = root().join("www");
    if !www.join("node_modules/playwright-core").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&www))?;
    }
    let dir = crate::page::build(true)?;
    let module = dir.join("pkg/hone_web_bg.wasm");
    let raw = std::fs::metadata(&module).map_err(|e| format!("{}: {e}", module.display()))?.len();
    let gz = Command::new("sh").arg("-c").arg(format!("gzip -9 -c '{}' | wc -c", module.display())).output().map_err(|e| e.to_string())?;
    let gz: u64 = String::from_utf8_lossy(&gz.stdout).trim().parse().map_err(|e| format!("gzip size: {e}"))?;
    eprintln!("bench: wasm module (release, wasm-opt -O2) {raw} bytes raw, {gz} bytes gzip -9");
    let addr = crate::page::serve_in_background(dir, None, 0)?;
    let data = target_dir().join("bench/colours.jsonl");
    let words = ["red", "blue", "green", "gold", "gray", "pink", "teal", "plum", "lime", "navy", "rose", "sand"];
    let lines: Vec<String> = (0..12).map(|i| serde_json::json!({ "prompt": format!("Colour {i}: "), "completion": format!("{} and {}.", words[i], words[(i + 5) % 12]) }).to_string()).collect();
    std::fs::write(&data, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    let (steps, batch, max_len) = ("8", "4", "48");
    let native = || -> Result<f64> {
        let out = target_dir().join("bench/wgpu-adapter");
        let _ = std::fs::remove_dir_all(&out);
        let mut c = Command::new(hone_bin());
        c.args(["train", "--quiet", "--backend", "wgpu", "--model"]).arg(root().join("tests/fixtures/smollm2")).arg("--data").arg(&data).arg("--out").arg(&out);
        c.args(["--steps", steps, "--batch-size", batch, "--max-len", max_len, "--rank", "4", "--alpha", "8", "--dropout", "0", "--lr", "0.01", "--seed", "7"]);
        let (_, stderr, _) = measured(&mut c)?;
        throughput(&stderr)
    };
    let page = || -> Result<f64> {
        let mut c = Command::new("node");
        c.arg(www.join("tests/step_bench.mjs")).arg(&addr).arg(&data).args([steps, batch, max_len]).current_dir(root());
        let (stdout, stderr, _) = measured(&mut c)?;
        let line = stdout.lines().last().unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("step_bench printed {line:?} ({e}):\n{stderr}"))?;
        v["train_tokens_per_s"].as_f64().ok_or_else(|| format!("no rate in {line}"))
    };
    eprintln!("bench: browser vs native wgpu — warm-up");
    native()?;
    page()?;
    let (mut b, mut n) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("bench: browser vs native wgpu — repetition {}/{reps}", rep + 1);
        n.push(native()?);
        b.push(page()?);
    }
    Ok((b, n, (raw, gz)))
}
