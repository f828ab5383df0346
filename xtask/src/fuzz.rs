//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` (the parsers of files hone takes
//! from anywhere) for a while each, starting from the committed seed corpora. Needs the nightly
//! toolchain (libFuzzer's coverage instrumentation; checked, since rustup cannot download one
//! here) and cargo-fuzz (installed into the tools dir). Each target's executions, new corpus
//! size and any crash are printed as it finishes; a crash's input is kept under
//! `fuzz/artifacts/<target>/` (turn it into a regression test in crates/hone/tests/mutations.rs).

use crate::{root, target_dir, tools, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable) [default: every target in fuzz/fuzz_targets].
    #[arg(long = "target")]
    targets: Vec<String>,
}

fn targets() -> Result<Vec<String>> {
    let dir = root().join("fuzz/fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".rs").map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

fn nightly() -> Result {
    let list = Command::new("rustup").args(["toolchain", "list"]).output().map_err(|e| format!("rustup: {e}"))?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with("nightly")) {
        Ok(())
    } else {
        Err("fuzzing needs the nightly toolchain (libFuzzer's instrumentation): rustup toolchain install nightly".into())
    }
}

/// What libFuzzer's final stats say: (executions, new corpus files).
fn stats(log: &str) -> (u64, u64) {
    let stat = |key: &str| log.lines().filter_map(|l| l.strip_prefix(key)?.trim().parse().ok()).last().unwrap_or(0);
    (stat("stat::number_of_executed_units:"), stat("stat::new_units_added:"))
}

pub fn fuzz(a: Args) -> Result {
    nightly()?;
    let cargo_fuzz = tools::tools_dir().join("bin/cargo-fuzz");
    tools::cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION, &cargo_fuzz)?;
    let all = targets()?;
    for t in &a.targets {
        if !all.contains(t) {
            return Err(format!("no fuzz target {t} (there are: {})", all.join(", ")));
        }
    }
    let chosen = if a.targets.is_empty() { all } else { a.targets.clone() };
    let mut crashed = Vec::new();
    for t in &chosen {
        // New inputs go to a working corpus in the target dir; the committed seeds stay as they are.
        let work = target_dir().join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let t0 = Instant::now();
        let mut c = Command::new(&cargo_fuzz);
        c.current_dir(root())
            .env("RUSTUP_TOOLCHAIN", "nightly")
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--sanitizer", "none", "--debug-assertions", "--target-dir"])
            .arg(target_dir().join("fuzz"))
            .arg(t)
            .arg(&work)
            .arg(root().join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={}", a.seconds))
            .args(["-rss_limit_mb=4096", "-timeout=20", "-print_final_stats=1"])
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        eprintln!("xtask: fuzz {t}: building and running for {} s", a.seconds);
        // The build's and libFuzzer's lines go on as they come, and are kept for the summary.
        let mut child = c.spawn().map_err(|e| format!("{}: {e}", cargo_fuzz.display()))?;
        let mut log = String::new();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines().map_while(|l| l.ok()) {
            eprintln!("{line}");
            log.push_str(&line);
            log.push('\n');
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let log_path = target_dir().join(format!("fuzz-{t}.log"));
        let _ = std::fs::write(&log_path, &log);
        let (runs, new) = stats(&log);
        if status.success() {
            println!("xtask: fuzz {t}: {runs} executions, {new} new inputs, 0 crashes ({:.0} s with the build; log {})", t0.elapsed().as_secs_f64(), log_path.display());
        } else {
            let artifact = log.lines().find(|l| l.contains("Test unit written to")).unwrap_or("no artifact line").to_string();
            let cause = log.lines().find(|l| l.contains("panicked at") || l.contains("ERROR: libFuzzer") || l.starts_with("error")).unwrap_or("see the log").to_string();
            println!("xtask: fuzz {t}: FAILED after {runs} executions: {cause}; {artifact} (log {})", log_path.display());
            crashed.push(t.clone());
        }
    }
    println!("xtask: fuzz: {} targets, {} crashed", chosen.len(), crashed.len());
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz targets that crashed: {}", crashed.join(", ")))
    }
}
