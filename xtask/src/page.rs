//! The page: `cargo xtask serve` builds it (wasm-bindgen `--target web` and the page's own
//! files) and serves it on 127.0.0.1; the page test serves it the
//! same way and drives it with playwright-core.

use crate::{cargo, root, run, target_dir, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The same policy as the page's meta tag, sent as a header too.
pub const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self' https: http://127.0.0.1:* http://localhost:*; style-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'";

/// Builds the page into `<target>/www/<profile>` and returns that folder. Each step says how
/// long it took; wasm-bindgen and wasm-opt (minutes on a release module) run only when cargo's
/// module changed since they last ran for this folder (a stamp holds its hash and the tools').
pub fn build(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    let t0 = Instant::now();
    let mut c = cargo();
    c.args(["build", "-p", "hone-web", "--target", "wasm32-unknown-unknown"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    eprintln!("xtask: page: cargo build ({profile}) {:.1} s", t0.elapsed().as_secs_f64());
    let wasm = target_dir().join("wasm32-unknown-unknown").join(profile).join("hone_web.wasm");
    let out = target_dir().join("www").join(profile);
    let pkg = out.join("pkg");
    let stamp_path = pkg.join(".hone-stamp");
    let t1 = Instant::now();
    let module = std::fs::read(&wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let bindgen_version = crate::tools::locked_version("wasm-bindgen")?;
    let stamp = format!("module {:016x} ({} bytes); wasm-bindgen {bindgen_version}; wasm-opt {}\n", content_hash(&module), module.len(), if release { WASM_OPT } else { "none" });
    drop(module);
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && pkg.join("hone_web_bg.wasm").exists() {
        eprintln!("xtask: page: module unchanged ({:.1} s to check): wasm-bindgen{} output reused", t1.elapsed().as_secs_f64(), if release { " and wasm-opt" } else { "" });
    } else {
        let _ = std::fs::remove_dir_all(&pkg);
        run(Command::new(crate::tools::wasm_bindgen()).args(["--target", "web", "--no-typescript", "--out-dir"]).arg(&pkg).arg(&wasm))?;
        // TypeScript users get the API's types from a separate run (kept out of the served folder).
        run(Command::new(crate::tools::wasm_bindgen()).args(["--target", "web", "--out-dir"]).arg(target_dir().join("www/types")).arg(&wasm))?;
        eprintln!("xtask: page: wasm-bindgen {:.1} s", t1.elapsed().as_secs_f64());
        // wasm-opt from npm's binaryen (pinned in www/package.json): Debian's binaryen 108 left a
        // module whose externref table init failed in Chromium ("WebAssembly.Table.set(): Argument
        // 1 is invalid"); 132 with the features rustc emits works. Release only: it takes minutes.
        if release {
            let t2 = Instant::now();
            crate::tools::npm("binaryen")?;
            let www = root().join("www");
            let module = pkg.join("hone_web_bg.wasm");
            let optimized = pkg.join("hone_web_bg.opt.wasm");
            let features = ["--enable-reference-types", "--enable-bulk-memory", "--enable-nontrapping-float-to-int", "--enable-sign-ext", "--enable-mutable-globals", "--enable-multivalue"];
            run(Command::new("node").arg(www.join("node_modules/binaryen/bin/wasm-opt")).arg(WASM_OPT).args(features).arg(&module).arg("-o").arg(&optimized))?;
            std::fs::rename(&optimized, &module).map_err(|e| format!("{}: {e}", module.display()))?;
            eprintln!("xtask: page: wasm-opt {WASM_OPT} {:.1} s", t2.elapsed().as_secs_f64());
        }
        // Written last: an interrupted run leaves no stamp, and the next one starts over.
        std::fs::write(&stamp_path, stamp).map_err(|e| format!("{}: {e}", stamp_path.display()))?;
    }
    for f in ["index.html", "app.js", "worker.js", "hub.js", "zip.js", "style.css"] {
        std::fs::copy(root().join("www").join(f), out.join(f)).map_err(|e| format!("www/{f}: {e}"))?;
    }
    eprintln!("xtask: page built in {:.1} s: {}", t0.elapsed().as_secs_f64(), out.display());
    Ok(out)
}

/// wasm-opt's optimisation level for the release page.
const WASM_OPT: &str = "-O2";

/// A hash of a file's bytes, to tell whether a build output changed (not cryptographic).
fn content_hash(bytes: &[u8]) -> u64 {
    // FNV-1a over 8-byte words: a few hundred MB/s, stable across Rust releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in tail {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ bytes.len() as u64
}

/// Serves `dir` (and the default model under /models/) on 127.0.0.1:`port` in a thread;
/// returns the address.
pub fn serve_in_background(dir: PathBuf, models: Option<PathBuf>, port: u16) -> Result<String> {
    let listener = TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
    let addr = format!("http://{}/", listener.local_addr().map_err(|e| e.to_string())?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (dir, models) = (dir.clone(), models.clone());
            std::thread::spawn(move || {
                let _ = respond(stream, &dir, models.as_deref());
            });
        }
    });
    Ok(addr)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css",
        Some("json") => "application/json",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn respond(mut stream: TcpStream, dir: &Path, default_model: Option<&Path>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/").split(['?', '#']).next().unwrap_or("/");
    let file: Option<(PathBuf, Option<Vec<u8>>)> = match target {
        "/" => Some((dir.join("index.html"), None)),
        "/models/index.json" => {
            let name = default_model.and_then(|m| m.file_name()).map(|n| n.to_string_lossy().to_string());
            Some((PathBuf::from("index.json"), Some(serde_json_min(name).into_bytes())))
        }
        t if t.starts_with("/models/") => default_model.filter(|m| m.file_name().is_some_and(|n| t == format!("/models/{}", n.to_string_lossy()))).map(|m| (m.to_path_buf(), None)),
        t if !t.contains("..") && !t.contains('\\') => Some((dir.join(t.trim_start_matches('/')), None)),
        _ => None,
    };
    let found = match file {
        Some((path, Some(bytes))) => Some((path, bytes.len() as u64, None, Some(bytes))),
        Some((path, None)) => std::fs::File::open(&path).ok().and_then(|f| {
            let len = f.metadata().ok().filter(|m| m.is_file())?.len();
            Some((path, len, Some(f), None))
        }),
        None => None,
    };
    let Some((path, len, file, bytes)) = found.filter(|_| method == "GET" || method == "HEAD") else {
        let body = b"not found";
        write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n", body.len())?;
        return stream.write_all(body);
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nContent-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\nCross-Origin-Resource-Policy: same-origin\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        content_type(&path)
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    match (file, bytes) {
        (Some(mut f), _) => {
            std::io::copy(&mut f, &mut stream)?;
        }
        (_, Some(b)) => stream.write_all(&b)?,
        _ => {}
    }
    stream.flush()?;
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    Ok(())
}

fn serde_json_min(default: Option<String>) -> String {
    match default {
        Some(n) => format!("{{\"default\": \"{}\"}}", n.replace('"', "")),
        None => "{}".into(),
    }
}

/// `cargo xtask serve [--port N] [--dev]`: builds the page (release unless --dev) and the CLI,
/// fetches the default model once, and serves until interrupted.
pub fn serve(port: u16, dev: bool) -> Result {
    let t0 = Instant::now();
    crate::tools::wasm()?;
    let model = crate::default_model()?;
    let t1 = Instant::now();
    run(cargo().args(["build", "-p", "hone-cli"]))?;
    eprintln!("xtask: hone CLI built (or up to date) in {:.1} s", t1.elapsed().as_secs_f64());
    let dir = build(!dev)?;
    let addr = serve_in_background(dir.clone(), Some(model.clone()), port)?;
    println!("hone: the CLI is {}", target_dir().join("debug/hone").display());
    println!("hone: default model {}", model.display());
    println!("hone: serving {} at {addr}  (ready {:.1} s after start; Ctrl-C stops)", dir.display(), t0.elapsed().as_secs_f64());
    loop {
        std::thread::park();
    }
}

/// The page test: builds the page (dev profile, sharing the browser tests' build), serves it,
/// and runs www/tests/page.test.mjs with playwright-core and Debian's chromium.
pub fn test(tally: &mut crate::Tally) -> Result {
    let www = root().join("www");
    crate::tools::npm("playwright-core")?;
    run(cargo().args(["build", "-p", "hone-cli"]))?;
    let dir = build(false)?;
    let addr = serve_in_background(dir.clone(), None, 0)?;
    let out = target_dir().join("page-test");
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new("node");
    c.arg(www.join("tests/page.test.mjs")).arg(&addr).arg(target_dir().join("debug/hone")).arg(&out).current_dir(root());
    tally.run(&mut c)
}

/// `cargo xtask test page-smollm2`: the page on the real default model, served as `cargo xtask
/// serve` serves it (the release page). Not in the default set: on SwiftShader it takes about a
/// quarter of an hour (see BENCHMARKS.md).
pub fn test_smollm2(tally: &mut crate::Tally) -> Result {
    let www = root().join("www");
    crate::tools::npm("playwright-core")?;
    let release = build(true)?;
    let addr = serve_in_background(release, Some(crate::default_model()?), 0)?;
    let mut c = Command::new("node");
    c.arg(www.join("tests/smollm2.test.mjs")).arg(&addr).current_dir(root());
    tally.run(&mut c)
}

/// `cargo xtask test page-phi3`: the release page on a random-weight checkpoint of
/// Phi-3-mini's shapes (made once into the target dir), compared with the release `hone train`.
pub fn test_phi3(tally: &mut crate::Tally) -> Result {
    crate::tools::npm("playwright-core")?;
    let model = target_dir().join("bench/Phi-3-mini-4k-instruct-random");
    if !model.join("config.json").exists() {
        crate::checkpoint::make(crate::checkpoint::Args { config: root().join("tests/fixtures/configs/Phi-3-mini-4k-instruct.json"), out: model.clone(), shard_size: 5_000_000_000, seed: 0 })?;
    }
    run(cargo().args(["build", "--release", "-p", "hone-cli"]))?;
    let release = build(true)?;
    let addr = serve_in_background(release, None, 0)?;
    let out = target_dir().join("page-phi3");
    let _ = std::fs::remove_dir_all(&out);
    let mut c = Command::new("node");
    c.arg(root().join("www/tests/phi3.test.mjs")).arg(&addr).arg(target_dir().join("release/hone")).arg(&model).arg(&out).current_dir(root());
    tally.run(&mut c)
}
