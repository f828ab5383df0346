//! `cargo xtask bench`: hone against its peer on the same model, data and settings, in one run,
//! alternating, after a warm-up, printing medians and ratios (hone / peer).
//!
//! Peer: PyTorch + PEFT + bitsandbytes on the CPU (bench/peft_qlora.py; the Python from
//! `HONE_REF_PYTHON`, else a venv of tests/reference/requirements.txt that xtask makes).
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

/// `cargo xtask bench`'s flags.
#[derive(clap::Args)]
pub struct Args {
    /// Timed repetitions of each case, after one warm-up of each side.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Cases to run, in order [default: tiny smollm2 browser].
    #[arg(long = "case", value_enum)]
    cases: Vec<CaseName>,
    /// Make this case fail at its start (to check that the other cases are still reported).
    #[arg(long, value_enum)]
    fail: Vec<CaseName>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum CaseName {
    /// The tiny llama fixture (2 layers, hidden 64), QLoRA, against PEFT + bitsandbytes.
    Tiny,
    /// SmolLM2-135M-Instruct QLoRA, against PEFT + bitsandbytes.
    Smollm2,
    /// The page (WebGPU on SwiftShader) against native wgpu on lavapipe.
    Browser,
    /// Random-weight checkpoints of Phi-3-mini's and Llama-3-8B's shapes (made once, 24 GB of
    /// disk): load, quantize and 2 QLoRA steps of 1×128 on the CPU, peak RSS against `hone
    /// plan`. Not in the default set (about 40 minutes on 2 cores); `--reps` is ignored.
    Scale,
}

impl CaseName {
    /// Minutes one timed repetition takes on a 2-core machine (BENCHMARKS.md's runs), and the
    /// warm-up counted as one more.
    fn minutes_per_rep(self) -> f64 {
        match self {
            CaseName::Tiny => 0.3,
            CaseName::Smollm2 => 2.5,
            CaseName::Browser => 1.5,
            CaseName::Scale => 20.0,
        }
    }
}

/// One case to run: its name, and the work, which returns the case's table (Markdown).
pub struct Job<'a> {
    pub name: String,
    pub run: Box<dyn FnOnce() -> Result<String> + 'a>,
}

/// Runs every job in turn; each finished job's table is printed and appended to `results` at
/// once, so a later failure loses nothing. A job that fails is reported and the others still
/// run. Returns the tables, or the failed jobs with their errors after all have run.
pub fn run_jobs(jobs: Vec<Job>, results: &Path) -> Result<Vec<String>> {
    let _ = std::fs::remove_file(results);
    let (mut tables, mut failed) = (Vec::new(), Vec::new());
    for job in jobs {
        let t0 = std::time::Instant::now();
        match (job.run)() {
            Ok(table) => {
                println!("\n{table}");
                let mut text = std::fs::read_to_string(results).unwrap_or_default();
                text.push_str(&table);
                text.push('\n');
                std::fs::write(results, text).map_err(|e| format!("{}: {e}", results.display()))?;
                eprintln!("bench: {} done in {:.0} s; table appended to {}", job.name, t0.elapsed().as_secs_f64(), results.display());
                tables.push(table);
            }
            Err(e) => {
                eprintln!("bench: {} FAILED after {:.0} s: {e}", job.name, t0.elapsed().as_secs_f64());
                failed.push(format!("{}: {e}", job.name));
            }
        }
    }
    if failed.is_empty() {
        Ok(tables)
    } else {
        Err(format!("{} of the cases failed (the others' tables are above and in {}):\n{}", failed.len(), results.display(), failed.join("\n")))
    }
}

const PEER_HEADER: &str = "| case | metric | hone | PyTorch+PEFT+bnb | hone / peer |\n|---|---|---|---|---|\n";

/// hone against the peer on one case: warm-up, then `reps` alternating runs; the table.
fn peer_case(case: &Case, data: &Path, reps: usize, threads: usize, python: &str) -> Result<String> {
    eprintln!("bench: {} — warm-up", case.name);
    hone_run(case, data, threads)?;
    peer_run(case, data, threads, python)?;
    let (mut hone, mut peer) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("bench: {} — repetition {}/{reps}", case.name, rep + 1);
        let mut h = hone_run(case, data, threads)?;
        h.generate_tokens_per_s = hone_generate(case, GEN_TOKENS, threads)?;
        hone.push(h);
        let mut p = peer_run(case, data, threads, python)?;
        p.generate_tokens_per_s = peer_generate(case, GEN_TOKENS, threads, python)?;
        peer.push(p);
    }
    let metrics: [(&str, fn(&Sample) -> f64); 4] = [
        ("train tokens/s", |s| s.tokens_per_s),
        ("peak RSS (MB)", |s| s.peak_rss_mb),
        ("load + quantize (s)", |s| s.load_s),
        ("greedy generation tokens/s (f32 base, 64 new)", |s| s.generate_tokens_per_s),
    ];
    let mut table = String::from(PEER_HEADER);
    for (metric, f) in metrics {
        let h = median(hone.iter().map(f).collect());
        let p = median(peer.iter().map(f).collect());
        table.push_str(&format!("| {} | {metric} | {h:.2} | {p:.2} | {:.2}x |\n", case.name, h / p));
    }
    table.push_str(&format!("\nmedians of {reps} alternating runs after a warm-up; {threads} threads each; hone = the release `hone` binary\n"));
    let h = median(hone.iter().map(|s| s.tokens_per_s).collect());
    let p = median(peer.iter().map(|s| s.tokens_per_s).collect());
    match flops_per_token(case) {
        Ok(flops) => table.push_str(&format!("\n{}\n", peak_line(threads, flops, h, p))),
        Err(e) => eprintln!("bench: no GFLOP/s estimate: {e}"),
    }
    Ok(table)
}

/// FLOPs of one trained token, from `hone plan`: the frozen products forward and backward
/// (`x·Wᵀ`, `dy·W`: 2 each per weight, NF4 linears and the f32 head), the LoRA terms (2 forward,
/// 4 backward per parameter). Attention's own products are left out (under 2% at these lengths).
fn flops_per_token(case: &Case) -> Result<f64> {
    let out = Command::new(hone_bin())
        .args(["plan", "--json", "--batch-size", &case.batch.to_string(), "--max-len", &case.max_len.to_string(), "--rank", &case.rank.to_string(), "--model"])
        .arg(&case.model)
        .output()
        .map_err(|e| e.to_string())?;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("hone plan --json: {e}"))?;
    let get = |k: &str| plan[k].as_f64().ok_or_else(|| format!("hone plan --json has no {k}"));
    // 4-bit codes: two weights per byte; the unquantized tables are f32 in the bench's models.
    let (linear, head) = (2.0 * get("nf4_codes_bytes")?, get("dense_bytes")? / 4.0);
    Ok(4.0 * (linear + head) + 6.0 * get("lora_params")?)
}

/// The machine's CPU level and FMA peak for `threads` threads, and what fraction of it each
/// side's training step reached.
fn peak_line(threads: usize, flops_per_token: f64, hone: f64, peer: f64) -> String {
    let levels = crate::cpu_levels();
    let level = std::env::var("HONE_CPU_LEVEL").unwrap_or_else(|_| levels.last().expect("scalar").to_string());
    let lanes = match level.as_str() {
        "avx512" => 16.0,
        "avx2" => 8.0,
        "neon" => 4.0,
        _ => 1.0,
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1))).unwrap_or("unknown CPU").trim().to_string();
    // The rated maximum where the kernel says it, else the clock cpuinfo reports now.
    let ghz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        .ok()
        .and_then(|k| k.trim().parse::<f64>().ok())
        .map(|khz| khz / 1e6)
        .or_else(|| cpuinfo.lines().find_map(|l| l.strip_prefix("cpu MHz").and_then(|r| r.split(':').nth(1)).and_then(|v| v.trim().parse::<f64>().ok())).map(|mhz| mhz / 1e3))
        .unwrap_or(f64::NAN);
    let peak = threads as f64 * 2.0 * lanes * 2.0 * ghz;
    let at = |tps: f64| tps * flops_per_token / 1e9;
    format!(
        "CPU: {model}; levels {}; hone's level {level}; FMA peak {peak:.0} GFLOP/s = {threads} threads × 2 FMA units × {lanes} lanes × 2 × {ghz:.2} GHz (2 units assumed). \
         At {:.0} MFLOP per trained token (frozen products forward and backward, LoRA): hone {:.1} GFLOP/s = {:.0}% of peak, peer {:.1} GFLOP/s = {:.0}%",
        levels.join(", "),
        flops_per_token / 1e6,
        at(hone),
        100.0 * at(hone) / peak,
        at(peer),
        100.0 * at(peer) / peak
    )
}

fn browser_case(reps: usize) -> Result<String> {
    let (page, native, (raw, gz)) = browser_vs_native(reps)?;
    let (b, n) = (median(page), median(native));
    Ok(format!(
        "| case | metric | browser (WebGPU, SwiftShader) | native wgpu (Vulkan, lavapipe) | browser step time / native |\n|---|---|---|---|---|\n| {BROWSER_CASE} | train tokens/s | {b:.2} | {n:.2} | {:.2}x |\n\nwasm module (release, wasm-opt -O2): {raw} bytes raw, {gz} bytes gzip -9 (target <= 10 MB gzip); medians of {reps} alternating runs after a warm-up\n",
        n / b
    ))
}

/// `cargo xtask bench`: says what it will run and for about how long, installs what the cases
/// need, then runs them (see [`run_jobs`]).
pub fn bench(args: Args) -> Result {
    let cases = if args.cases.is_empty() { vec![CaseName::Tiny, CaseName::Smollm2, CaseName::Browser] } else { args.cases.clone() };
    let reps = args.reps.max(1);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let minutes: f64 = cases.iter().map(|c| c.minutes_per_rep() * if *c == CaseName::Scale { 2.0 } else { (reps + 1) as f64 }).sum();
    let names: Vec<String> = cases.iter().map(|c| format!("{c:?}").to_lowercase()).collect();
    eprintln!("bench: will run {} ({reps} repetitions after a warm-up each, the scale case once; {threads} threads): roughly {minutes:.0} minutes on 2 cores, plus installs and builds the first time", names.join(", "));
    let t0 = std::time::Instant::now();
    run(cargo().args(["build", "--release", "-p", "hone-cli"]))?;
    eprintln!("bench: release hone built (or up to date) in {:.0} s", t0.elapsed().as_secs_f64());
    let needs_peer = cases.iter().any(|c| matches!(c, CaseName::Tiny | CaseName::Smollm2));
    let python = if needs_peer { crate::tools::reference_python()?.to_string_lossy().to_string() } else { String::new() };
    if cases.contains(&CaseName::Browser) {
        crate::tools::wasm()?;
        crate::tools::browser()?;
        crate::tools::npm("playwright-core")?;
    }
    let data = bench_data()?;
    let mut jobs = Vec::new();
    for &name in &cases {
        let (data, python, fail) = (data.clone(), python.clone(), args.fail.contains(&name));
        let run: Box<dyn FnOnce() -> Result<String>> = Box::new(move || {
            if fail {
                return Err("made to fail by --fail".into());
            }
            match name {
                CaseName::Tiny => {
                    let case = Case { name: "tiny fixture (llama, 2 layers, hidden 64), QLoRA r=8", model: root().join("tests/fixtures/llama"), steps: 12, batch: 4, max_len: 64, rank: 8 };
                    peer_case(&case, &data, reps, threads, &python)
                }
                CaseName::Smollm2 => {
                    // transformers cannot put bitsandbytes on a GGUF: both sides load the same f32 HF folder.
                    let smollm2 = target_dir().join("bench/SmolLM2-135M-Instruct-hf");
                    if !smollm2.join("config.json").exists() {
                        run(Command::new(&python).arg(root().join("bench/peft_qlora.py")).arg("--model").arg(crate::default_model()?).arg("--data").arg(&data).arg("--export-hf").arg(&smollm2))?;
                    }
                    let case = Case { name: "SmolLM2-135M QLoRA r=16 all-linear, seq <=256, batch 4", model: smollm2, steps: 6, batch: 4, max_len: 256, rank: 16 };
                    peer_case(&case, &data, reps, threads, &python)
                }
                CaseName::Browser => browser_case(reps),
                CaseName::Scale => scale_case(),
            }
        });
        jobs.push(Job { name: format!("{name:?}").to_lowercase(), run });
    }
    let tables = run_jobs(jobs, &target_dir().join("bench/results.md"))?;
    println!("\nbench: all {} cases done in {:.0} s:\n\n{}", tables.len(), t0.elapsed().as_secs_f64(), tables.join("\n"));
    Ok(())
}

/// The headline shapes on this machine's CPU: for each, a random bf16 checkpoint made by
/// `cargo xtask make-checkpoint` (kept in the target dir), `hone plan` for the run, then the run
/// itself, its peak RSS sampled from /proc.
fn scale_case() -> Result<String> {
    let configs = [("Phi-3-mini-4k-instruct", "Phi-3-mini-4k-instruct.json"), ("Llama-3-8B", "Meta-Llama-3-8B.json")];
    let data = target_dir().join("bench/scale_text.jsonl");
    // Plain text of well over 128 bytes a line (the made tokenizer is one token per byte).
    let lines: Vec<String> = (0..8).map(|i| serde_json::json!({ "text": format!("Sample {i}: {}", "the quick brown fox jumps over the lazy dog; ".repeat(6)) }).to_string()).collect();
    std::fs::write(&data, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    let mut table = String::from("| model (random weights, bf16) | planned peak | measured peak RSS | measured / planned | load + quantize (s) | train tokens/s (2 steps, 1×128) |\n|---|---|---|---|---|---|\n");
    for (name, config) in configs {
        let dir = target_dir().join("bench").join(format!("{name}-random"));
        if !dir.join("config.json").exists() {
            eprintln!("bench: scale — making {} (random bf16 weights of {name}'s shapes)", dir.display());
            crate::checkpoint::make(crate::checkpoint::Args { config: root().join("tests/fixtures/configs").join(config), out: dir.clone(), shard_size: 5_000_000_000, seed: 0 })?;
        }
        let settings = ["--rank", "16", "--batch-size", "1", "--max-len", "128"];
        let plan = Command::new(hone_bin()).args(["plan", "--json", "--backend", "cpu"]).args(settings).arg("--model").arg(&dir).output().map_err(|e| e.to_string())?;
        let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).map_err(|e| format!("hone plan: {e}: {}", String::from_utf8_lossy(&plan.stderr)))?;
        let planned = plan["total_bytes"].as_f64().ok_or("hone plan printed no total_bytes")? / 1e6;
        eprintln!("bench: scale — {name}: planned {planned:.0} MB; training 2 steps");
        let out = target_dir().join("bench/scale-adapter");
        let _ = std::fs::remove_dir_all(&out);
        let mut c = Command::new(hone_bin());
        c.args(["train", "--quiet", "--format", "text", "--steps", "2", "--alpha", "32"]).args(settings).arg("--model").arg(&dir).arg("--data").arg(&data).arg("--out").arg(&out);
        let (_, stderr, peak) = measured(&mut c)?;
        let load_s = stderr.lines().find_map(|l| l.split(" loaded in ").nth(1)).and_then(|v| v.split('s').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let tps = throughput(&stderr)?;
        let row = format!("| {name} | {planned:.0} MB | {peak:.0} MB | {:.3} | {load_s:.0} | {tps:.3} |\n", peak / planned);
        eprint!("bench: scale — {row}");
        table.push_str(&row);
    }
    table.push_str("\nthe CPU backend (burn NdArray), r=16 all-linear, checkpointing on; peak RSS sampled every 50 ms from /proc\n");
    Ok(table)
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

#[cfg(test)]
mod tests {
    use super::{run_jobs, Job};

    /// A case that fails does not lose the finished cases' tables, nor stop the later ones.
    #[test]
    fn a_failed_case_keeps_the_others_tables() {
        let results = std::env::temp_dir().join(format!("hone-bench-test-{}.md", std::process::id()));
        let jobs = vec![
            Job { name: "first".into(), run: Box::new(|| Ok("| first table |".to_string())) },
            Job { name: "second".into(), run: Box::new(|| Err("it broke".to_string())) },
            Job { name: "third".into(), run: Box::new(|| Ok("| third table |".to_string())) },
        ];
        let err = run_jobs(jobs, &results).unwrap_err();
        assert!(err.contains("second: it broke") && err.starts_with("1 of the cases failed"), "{err}");
        let written = std::fs::read_to_string(&results).unwrap();
        assert_eq!(written, "| first table |\n| third table |\n");
        std::fs::remove_file(&results).unwrap();
    }
}
