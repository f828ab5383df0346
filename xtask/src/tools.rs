//! What the commands need installed, checked and installed when missing: the wasm32 target and
//! wasm-bindgen-cli (the page, the browser tests), Debian's chromium, chromedriver and lavapipe
//! (the browser tests, wgpu on a machine without a GPU), npm packages of www/, and the Python
//! reference stack (the bench). Each says what it found or installed.

use crate::{cache_dir, cargo, root, run, target_dir, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Where the tools xtask installs live (`HONE_TOOLS`, default ~/.cache/hone/tools).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("HONE_TOOLS").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("tools"))
}

pub fn wasm_bindgen() -> PathBuf {
    tools_dir().join("bin/wasm-bindgen")
}

pub fn wasm_bindgen_runner() -> PathBuf {
    tools_dir().join("bin/wasm-bindgen-test-runner")
}

pub fn have(program: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {program} >/dev/null 2>&1")).status().is_ok_and(|s| s.success())
}

/// The version of a package pinned in Cargo.lock.
pub fn locked_version(package: &str) -> Result<String> {
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

/// The wasm32 target and wasm-bindgen-cli at Cargo.lock's wasm-bindgen version.
pub fn wasm() -> Result {
    rustup_target("wasm32-unknown-unknown")?;
    let version = locked_version("wasm-bindgen")?;
    cargo_tool("wasm-bindgen-cli", &version, &wasm_bindgen())
}

/// `krate` at exactly `version` into the tools dir, unless `bin` already reports that version.
///
/// First with the crate's own lockfile (`--locked`); when that fails — a version it pins can
/// disappear from the registry (wasm-bindgen-cli 0.2.130's lockfile pins a webpki-roots that
/// was withdrawn) — again with a fresh resolution of its dependencies, saying so. The build
/// happens in the shared target dir, so installing into an empty tools dir again (as CI does on
/// every run) relinks instead of recompiling.
pub fn cargo_tool(krate: &str, version: &str, bin: &Path) -> Result {
    let reported = Command::new(bin).arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(v) = reported.as_ref().filter(|v| v.split_whitespace().any(|w| w == version)) {
        eprintln!("xtask: {krate} {version} is installed ({v})");
        return Ok(());
    }
    let t0 = Instant::now();
    let install = |locked: bool| {
        let mut c = cargo();
        c.arg("install").args(locked.then_some("--locked")).args([krate, "--version", &format!("={version}"), "--root"]).arg(tools_dir());
        c.arg("--target-dir").arg(target_dir().join("tools"));
        run(&mut c)
    };
    if let Err(e) = install(true) {
        eprintln!("xtask: the locked install of {krate} {version} failed ({e}); its lockfile pins a dependency the registry may no longer offer: installing again with a fresh resolution of its dependencies");
        install(false).map_err(|e| format!("{krate} {version} could not be installed, locked or not: {e}"))?;
    }
    let v = Command::new(bin).arg("--version").output().map_err(|e| format!("{}: {e}", bin.display()))?;
    eprintln!("xtask: installed {krate} {version} into {} in {:.0} s ({})", tools_dir().display(), t0.elapsed().as_secs_f64(), String::from_utf8_lossy(&v.stdout).trim());
    Ok(())
}

/// Debian's chromium and chromedriver (browser tests) and mesa's lavapipe (wgpu without a GPU),
/// installed with apt when run as root.
pub fn browser() -> Result {
    let vulkan_icd = std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("lvp")));
    if have("chromium") && have("chromedriver") && vulkan_icd {
        return Ok(());
    }
    apt_install(&["chromium", "chromium-driver", "mesa-vulkan-drivers"])
}

/// The aarch64 Linux target, Debian's cross gcc (the linker) and qemu-user (the runner), for
/// `cargo xtask test aarch64`; apt as root.
pub fn aarch64() -> Result {
    rustup_target("aarch64-unknown-linux-gnu")?;
    if have("aarch64-linux-gnu-gcc") && have("qemu-aarch64") {
        return Ok(());
    }
    apt_install(&["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user"])
}

/// rustup's `target`, added unless installed.
fn rustup_target(target: &str) -> Result {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output().map_err(|e| format!("rustup: {e}"))?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == target) {
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

/// Debian `packages` with apt when run as root; otherwise an error saying what to install.
fn apt_install(packages: &[&str]) -> Result {
    let list = packages.join(" ");
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        return Err(format!("install Debian's {list} (as root: apt-get install -y {list}), then run again"));
    }
    let t0 = Instant::now();
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get").args(["install", "-y"]).args(packages))?;
    eprintln!("xtask: installed {list} in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// www/'s npm packages (playwright-core, binaryen), from its package-lock.json, when `package`
/// is missing.
pub fn npm(package: &str) -> Result {
    let www = root().join("www");
    if !www.join("node_modules").join(package).exists() {
        let t0 = Instant::now();
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&www))?;
        eprintln!("xtask: installed www/'s npm packages in {:.0} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The Python of the reference stack (tests/reference/requirements.txt): `HONE_REF_PYTHON`
/// when set, else a venv in the cache, made (or brought up to date) with pip when the
/// requirements changed since it was last installed.
pub fn reference_python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HONE_REF_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = cache_dir().join("ref-venv");
    let python = venv.join("bin/python");
    let requirements = root().join("tests/reference/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).map_err(|e| format!("{}: {e}", requirements.display()))?;
    let stamp = venv.join("hone-requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        eprintln!("xtask: reference venv {} is up to date", venv.display());
        return Ok(python);
    }
    let t0 = Instant::now();
    eprintln!("xtask: installing the reference stack into {} (torch, transformers, peft, bitsandbytes, …: several GB the first time)", venv.display());
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(&requirements))?;
    std::fs::write(&stamp, wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    eprintln!("xtask: reference venv ready in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(python)
}
