//! The page: `cargo xtask serve` builds it (wasm-bindgen `--target web` and the page's own
//! files) and serves it on 127.0.0.1; the page test serves it the
//! same way and drives it with playwright-core.

use crate::{cargo, root, run, target_dir, tools_dir, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The same policy as the page's meta tag, sent as a header too.
pub const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self' https:; style-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'";

/// Builds the page into `<target>/www/<profile>` and returns that folder.
pub fn build(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    let mut c = cargo();
    c.args(["build", "-p", "hone-web", "--target", "wasm32-unknown-unknown"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    let wasm = target_dir().join("wasm32-unknown-unknown").join(profile).join("hone_web.wasm");
    let out = target_dir().join("www").join(profile);
    let pkg = out.join("pkg");
    let _ = std::fs::remove_dir_all(&pkg);
    run(Command::new(tools_dir().join("bin/wasm-bindgen")).args(["--target", "web", "--no-typescript", "--out-dir"]).arg(&pkg).arg(&wasm))?;
    // TypeScript users get the API's types from a separate run (kept out of the served folder).
    run(Command::new(tools_dir().join("bin/wasm-bindgen")).args(["--target", "web", "--out-dir"]).arg(target_dir().join("www/types")).arg(&wasm))?;
    // wasm-opt from npm's binaryen (pinned in www/package.json): Debian's binaryen 108 left a
    // module whose externref table init failed in Chromium ("WebAssembly.Table.set(): Argument
    // 1 is invalid"); 132 with the features rustc emits works. Release only: it takes minutes.
    if release {
        let www = root().join("www");
        if !www.join("node_modules/binaryen").exists() {
            run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&www))?;
        }
        let module = pkg.join("hone_web_bg.wasm");
        let optimized = pkg.join("hone_web_bg.opt.wasm");
        let features = ["--enable-reference-types", "--enable-bulk-memory", "--enable-nontrapping-float-to-int", "--enable-sign-ext", "--enable-mutable-globals", "--enable-multivalue"];
        run(Command::new("node").arg(www.join("node_modules/binaryen/bin/wasm-opt")).arg("-O2").args(features).arg(&module).arg("-o").arg(&optimized))?;
        std::fs::rename(&optimized, &module).map_err(|e| format!("{}: {e}", module.display()))?;
    }
    for f in ["index.html", "app.js", "worker.js", "zip.js", "style.css"] {
        std::fs::copy(root().join("www").join(f), out.join(f)).map_err(|e| format!("www/{f}: {e}"))?;
    }
    Ok(out)
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
pub fn serve(args: &[String]) -> Result {
    let dev = args.iter().any(|a| a == "--dev");
    let port = args.iter().position(|a| a == "--port").and_then(|i| args.get(i + 1)).map(|p| p.parse::<u16>().map_err(|e| format!("--port: {e}"))).transpose()?.unwrap_or(8080);
    crate::setup()?;
    let model = crate::default_model()?;
    run(cargo().args(["build", "-p", "hone-cli"]))?;
    let dir = build(!dev)?;
    let addr = serve_in_background(dir.clone(), Some(model.clone()), port)?;
    println!("hone: the CLI is {}", target_dir().join("debug/hone").display());
    println!("hone: default model {}", model.display());
    println!("hone: serving {} at {addr}  (Ctrl-C stops)", dir.display());
    loop {
        std::thread::park();
    }
}

/// The page test: builds the page (dev profile, sharing the browser tests' build), serves it,
/// and runs www/tests/page.test.mjs with playwright-core and Debian's chromium.
pub fn test(tally: &mut crate::Tally) -> Result {
    let www = root().join("www");
    if !www.join("node_modules/playwright-core").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&www))?;
    }
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
    if !www.join("node_modules/playwright-core").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&www))?;
    }
    let release = build(true)?;
    let addr = serve_in_background(release, Some(crate::default_model()?), 0)?;
    let mut c = Command::new("node");
    c.arg(www.join("tests/smollm2.test.mjs")).arg(&addr).current_dir(root());
    tally.run(&mut c)
}
