//! Hub ids against a local server that answers as the Hugging Face Hub does (its API listing,
//! `resolve` URLs with ranges, X-Repo-Commit and the LFS sha256 as X-Linked-Etag), serving the
//! tiny fixtures: downloads land in the cache layout huggingface_hub uses, an offline run makes
//! no request, a cut download resumes with a range, a damaged blob is caught by its sha256, and
//! a cache laid out by hand as huggingface_hub lays it out is found offline.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
}

#[derive(Default)]
struct State {
    /// (repo path as in URLs, e.g. `org/name` or `datasets/org/name`) → files.
    repos: HashMap<String, Vec<(String, Vec<u8>)>>,
    seen: Vec<Seen>,
    /// File name → how many more full-body answers to cut halfway.
    cut: HashMap<String, usize>,
    /// File names served with one byte flipped (the headers keep the true sha256).
    corrupt: Vec<String>,
}

struct Server {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start(state: State) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Server { url, state }
    }
    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.seen.push(Seen { path: path.clone(), range: range.clone() });
    let reply = |stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    // The API: /api/{models|datasets}/org/name/revision/rev
    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap();
        let (repo, _rev) = rest.split_once("/revision/").unwrap();
        let key = if kind == "datasets" { format!("datasets/{repo}") } else { repo.to_string() };
        return match st.repos.get(&key) {
            Some(files) => {
                let siblings: Vec<_> = files.iter().map(|(n, _)| serde_json::json!({ "rfilename": n })).collect();
                let body = serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings }).to_string();
                reply(&mut stream, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes())
            }
            None => reply(&mut stream, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}"),
        };
    }
    // Files: /[datasets/]org/name/resolve/rev/file
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return reply(&mut stream, "404 Not Found", &[], b"");
    };
    let file = rest.split_once('/').map(|(_, f)| f.to_string()).unwrap_or_default();
    let Some(bytes) = st.repos.get(repo).and_then(|fs| fs.iter().find(|(n, _)| *n == file)).map(|(_, b)| b.clone()) else {
        return reply(&mut stream, "404 Not Found", &[], b"Entry not found");
    };
    let lfs = file.ends_with(".safetensors") || file.ends_with(".parquet");
    let mut headers = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
    if lfs {
        headers.push(("X-Linked-Etag".into(), format!("\"{}\"", sha256(&bytes))));
        headers.push(("ETag".into(), "\"lfs-pointer-etag\"".into()));
    } else {
        // A git blob's id, as the Hub gives small files (not a sha256: not checked).
        headers.push(("ETag".into(), format!("\"{}\"", &sha256(&bytes)[..40])));
    }
    let mut body = bytes.clone();
    if st.corrupt.contains(&file) {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let total = body.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() { total - 1 } else { b.parse::<usize>().unwrap().min(total - 1) };
            (a, b)
        }
        None => (0, total - 1),
    };
    headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{total}")));
    let part = &body[start..=end];
    let whole_body = part.len() > 1;
    let cut = whole_body && st.cut.get(&file).is_some_and(|n| *n > 0);
    if cut {
        *st.cut.get_mut(&file).unwrap() -= 1;
    }
    drop(st);
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    if cut {
        // Promise the whole range, send half, and hang up.
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", part.len());
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&part[..part.len() / 2]);
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    reply(&mut stream, status, &headers, part);
}

fn read_dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["config.json", "model.safetensors", "tokenizer.json"].iter().map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap())).collect()
}

fn state_with_llama() -> State {
    let mut files = read_dir_files(&fixtures().join("llama"));
    files.push(("README.md".into(), b"# tiny".to_vec()));
    files.push(("pytorch_model.bin".into(), b"not read".to_vec()));
    let mut st = State::default();
    st.repos.insert("hone-test/tiny-llama".into(), files);
    st
}

struct Env {
    home: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let home = std::env::temp_dir().join(format!("hone-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        Env { home }
    }
    fn hone(&self, endpoint: &str, offline: bool, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hone"));
        c.args(args).env("HF_HOME", self.home.join("hf")).env("HF_ENDPOINT", endpoint).env_remove("HF_HUB_CACHE").env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c.output().unwrap()
    }
    fn repo(&self) -> PathBuf {
        self.home.join("hf/hub/models--hone-test--tiny-llama")
    }
    fn logits(&self, endpoint: &str, offline: bool, model: &str) -> Result<Vec<u8>, String> {
        let out = self.home.join("logits.safetensors");
        let _ = std::fs::remove_file(&out);
        let o = self.hone(endpoint, offline, &["logits", "--model", model, "--input-ids", "1,2,3,4", "--out", out.to_str().unwrap()]);
        if o.status.success() {
            Ok(std::fs::read(&out).unwrap())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn expected_logits(env: &Env) -> Vec<u8> {
    env.logits("http://127.0.0.1:9", true, fixtures().join("llama").to_str().unwrap()).unwrap()
}

#[test]
fn a_hub_id_downloads_into_the_cache_layout_and_is_used_offline() {
    let server = Server::start(state_with_llama());
    let env = Env::new("layout");
    let want = expected_logits(&env);
    assert_eq!(env.logits(&server.url, false, "hone-test/tiny-llama").unwrap(), want);

    // huggingface_hub's layout: refs/main → the commit; snapshots/<commit>/<file> → ../../blobs/<etag>.
    let repo = env.repo();
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), COMMIT);
    let snap = repo.join("snapshots").join(COMMIT);
    let weights = std::fs::read(fixtures().join("llama/model.safetensors")).unwrap();
    let link = std::fs::read_link(snap.join("model.safetensors")).unwrap();
    assert_eq!(link, PathBuf::from("../../blobs").join(sha256(&weights)));
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), weights);
    assert!(snap.join("config.json").exists() && snap.join("tokenizer.json").exists());
    // Only what hone reads: not the README, not the PyTorch weights.
    assert!(!snap.join("pytorch_model.bin").exists() && !snap.join("README.md").exists());
    let resolves = |seen: &[Seen]| seen.iter().filter(|s| s.path.contains("/resolve/")).count();
    assert!(resolves(&server.seen()) >= 3);

    // A second online run asks for the listing only; an offline one asks for nothing.
    let before = server.seen().len();
    assert_eq!(env.logits(&server.url, false, "hone-test/tiny-llama").unwrap(), want);
    let second: Vec<Seen> = server.seen()[before..].to_vec();
    assert_eq!(resolves(&second), 0, "{second:?}");
    let before = server.seen().len();
    assert_eq!(env.logits(&server.url, true, "hone-test/tiny-llama").unwrap(), want);
    assert_eq!(server.seen().len(), before, "HF_HUB_OFFLINE=1 made requests");
    // An unreachable endpoint falls back to the cache, saying so.
    let o = env.hone("http://127.0.0.1:9", false, &["plan", "--model", "hone-test/tiny-llama"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be reached"));

    // An adapter trained on a Hub id names its base as PEFT does, by the id.
    let out = env.home.join("adapter");
    let data = fixtures().join("tables/completion.csv");
    let o = env.hone(&server.url, true, &["train", "--model", "hone-test/tiny-llama", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", "1", "--rank", "2", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["base_model_name_or_path"], "hone-test/tiny-llama");

    // Offline and not cached: a clear error naming the cache.
    let e = env.logits(&server.url, true, "hone-test/absent").unwrap_err();
    assert!(e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"), "{e}");
    // Online and unknown to the Hub.
    let e = env.logits(&server.url, false, "hone-test/absent").unwrap_err();
    assert!(e.contains("404") && e.contains("not found"), "{e}");
}

#[test]
fn plan_downloads_the_config_alone() {
    let server = Server::start(state_with_llama());
    let env = Env::new("plan");
    let o = env.hone(&server.url, false, &["plan", "--model", "hone-test/tiny-llama"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fetched: Vec<String> = server.seen().into_iter().filter(|s| s.path.contains("/resolve/")).map(|s| s.path).collect();
    assert!(!fetched.is_empty() && fetched.iter().all(|p| p.ends_with("/config.json")), "{fetched:?}");
    // The weights come when a command needs them.
    let want = expected_logits(&env);
    assert_eq!(env.logits(&server.url, false, "hone-test/tiny-llama").unwrap(), want);
}

#[test]
fn a_cut_download_resumes_with_a_range() {
    let mut st = state_with_llama();
    // More cuts than one run retries (3): the first run fails and keeps its partial file.
    st.cut.insert("model.safetensors".into(), 4);
    let server = Server::start(st);
    let env = Env::new("resume");
    let want = expected_logits(&env);
    let e = env.logits(&server.url, false, "hone-test/tiny-llama").unwrap_err();
    assert!(e.contains("model.safetensors") && e.contains("resume"), "{e}");
    let partial = std::fs::read_dir(env.repo().join("blobs")).unwrap().flatten().find(|e| e.path().extension().is_some_and(|x| x == "part")).expect("a .part file");
    let kept = partial.metadata().unwrap().len();
    assert!(kept > 0);
    // Within the run, each retry went on from where the cut left it.
    let ranged: Vec<u64> = server
        .seen()
        .iter()
        .filter(|s| s.path.ends_with("model.safetensors"))
        .filter_map(|s| s.range.as_deref()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect();
    assert!(ranged.iter().any(|&r| r > 0), "{ranged:?}");
    let before = server.seen().len();
    assert_eq!(env.logits(&server.url, false, "hone-test/tiny-llama").unwrap(), want);
    let resumed = server.seen()[before..].iter().filter(|s| s.path.ends_with("model.safetensors")).filter_map(|s| s.range.clone()).collect::<Vec<_>>();
    assert!(resumed.contains(&format!("bytes={kept}-")), "the second run did not resume at {kept}: {resumed:?}");
}

#[test]
fn a_damaged_blob_is_caught_by_its_sha256() {
    let mut st = state_with_llama();
    st.corrupt.push("model.safetensors".into());
    let server = Server::start(st);
    let env = Env::new("sha");
    let e = env.logits(&server.url, false, "hone-test/tiny-llama").unwrap_err();
    assert!(e.contains("model.safetensors is damaged") && e.contains("sha256"), "{e}");
    let weights = std::fs::read(fixtures().join("llama/model.safetensors")).unwrap();
    assert!(!env.repo().join("blobs").join(sha256(&weights)).exists(), "the damaged blob was kept");
    server.state.lock().unwrap().corrupt.clear();
    assert_eq!(env.logits(&server.url, false, "hone-test/tiny-llama").unwrap(), expected_logits(&env));
}

#[test]
fn a_cache_laid_out_by_huggingface_hub_is_found_offline() {
    let env = Env::new("prepared");
    let repo = env.repo();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (name, bytes) in read_dir_files(&fixtures().join("llama")) {
        let blob = sha256(&bytes);
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(PathBuf::from("../../blobs").join(&blob), snap.join(&name)).unwrap();
    }
    let want = expected_logits(&env);
    assert_eq!(env.logits("http://127.0.0.1:9", true, "hone-test/tiny-llama").unwrap(), want);
    // By commit, and by a tag the cache does not know.
    assert_eq!(env.logits("http://127.0.0.1:9", true, &format!("hone-test/tiny-llama@{COMMIT}")).unwrap(), want);
    let e = env.logits("http://127.0.0.1:9", true, "hone-test/tiny-llama@v2").unwrap_err();
    assert!(e.contains("not in the Hugging Face cache"), "{e}");
}

#[test]
fn a_hub_dataset_split_reads_like_the_file() {
    let tables = fixtures().join("tables");
    let mut st = State::default();
    st.repos.insert(
        "datasets/hone-test/rows".into(),
        vec![
            ("README.md".into(), b"# rows".to_vec()),
            ("data/train-00000-of-00001.parquet".into(), std::fs::read(tables.join("completion.parquet")).unwrap()),
            ("data/test-00000-of-00001.parquet".into(), std::fs::read(tables.join("text.parquet")).unwrap()),
        ],
    );
    let server = Server::start(st);
    let env = Env::new("dataset");
    let model = fixtures().join("llama");
    let eval = |data: &str, split: Option<&str>, offline: bool| {
        let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", data, "--json"];
        if let Some(s) = split {
            args.extend(["--split", s]);
        }
        let o = env.hone(&server.url, offline, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let local = eval(tables.join("completion.parquet").to_str().unwrap(), None, false);
    assert_eq!(eval("hone-test/rows", Some("train"), false), local);
    // eval's default split is test.
    assert_eq!(eval("hone-test/rows", None, false), eval(tables.join("text.parquet").to_str().unwrap(), None, false));
    let before = server.seen().len();
    assert_eq!(eval("hone-test/rows", Some("train"), true), local);
    assert_eq!(server.seen().len(), before);
    let o = env.hone(&server.url, false, &["eval", "--model", model.to_str().unwrap(), "--data", "hone-test/rows", "--split", "validation"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no data files for split \"validation\"") && e.contains("splits found: test, train"), "{e}");
}
