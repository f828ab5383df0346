//! Hugging Face Hub ids where a model or a dataset is taken: `org/name[@revision][:FILE]`.
//!
//! An id is looked up in the local Hugging Face cache first, laid out as huggingface_hub and
//! transformers lay it out (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `models--org--name/{refs,snapshots,blobs}`), so what they
//! downloaded is found offline; what is missing is downloaded into that same layout by the
//! `hf-hub` crate (resumable `.part` files, ranged retries). hone adds what the crate leaves
//! out: `HF_HUB_OFFLINE` and `HF_TOKEN`, a check of every LFS blob against its sha256, a choice
//! of which files a model needs, and dataset splits.

use anyhow::{bail, Context};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A parsed Hub id.
#[derive(Debug, Clone, PartialEq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
    /// `:FILE` — one file of the repository (a GGUF among several), or a tag that one file
    /// name holds (`:Q4_K_M`, as llama.cpp's `-hf`).
    pub file: Option<String>,
}

impl HubId {
    /// `org/name[@revision][:FILE]`, or None when `s` does not look like one.
    pub fn parse(s: &str) -> Option<HubId> {
        let (rest, file) = match s.split_once(':') {
            Some((r, f)) if !f.is_empty() => (r, Some(f.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        let name_ok = |p: &str| !p.is_empty() && !p.starts_with(['.', '-']) && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let mut parts = repo.split('/');
        let (org, name) = (parts.next()?, parts.next()?);
        if parts.next().is_some() || !name_ok(org) || !name_ok(name) || name.ends_with(".gguf") {
            return None;
        }
        Some(HubId { repo: repo.to_string(), revision, file })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.repo)?;
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// The Hub id a model or data argument is, when it is not an existing path.
pub fn id_of(arg: &Path) -> Option<HubId> {
    (!arg.exists()).then(|| arg.to_str().and_then(HubId::parse)).flatten()
}

/// What a model argument names: an existing path as it is, else a Hub id resolved to its
/// snapshot directory (or the GGUF file in it).
pub fn model_path(arg: &Path) -> anyhow::Result<PathBuf> {
    resolve_model(arg, false)
}

/// As [`model_path`] for what reads only the config (`hone plan`): of a Hub id, only its
/// config.json is downloaded (a GGUF file whole, its header being its config).
pub fn config_path(arg: &Path) -> anyhow::Result<PathBuf> {
    resolve_model(arg, true)
}

fn resolve_model(arg: &Path, config_only: bool) -> anyhow::Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    match id_of(arg) {
        Some(id) => Hub::from_env()?.model(&id, config_only),
        None => bail!("{}: no such file or directory (nor a Hub id, org/name[@revision])", arg.display()),
    }
}

/// The files of a dataset argument: the path as it is, else the files of a Hub dataset's
/// `split` (Parquet, JSONL, JSON or CSV).
pub fn dataset_files(arg: &Path, split: &str) -> anyhow::Result<Vec<PathBuf>> {
    if arg.exists() {
        return Ok(vec![arg.to_path_buf()]);
    }
    match arg.to_str().and_then(HubId::parse) {
        Some(id) => Hub::from_env()?.dataset(&id, split),
        None => bail!("{}: no such file (nor a Hub dataset id, org/name[@revision])", arg.display()),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The local cache and, unless offline, the endpoint.
pub struct Hub {
    cache_dir: PathBuf,
    api: Option<Api>,
    endpoint: String,
}

impl Hub {
    pub fn from_env() -> anyhow::Result<Hub> {
        let home = || std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        let hf_home = std::env::var_os("HF_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/huggingface"));
        let cache_dir = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let offline = env_flag("HF_HUB_OFFLINE");
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).map(|e| e.trim_end_matches('/').to_string());
        let endpoint = endpoint.unwrap_or_else(|| ["https:/", "huggingface.co"].join("/"));
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()).or_else(|| {
            let t = std::fs::read_to_string(hf_home.join("token")).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let api = if offline {
            None
        } else {
            let built = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
                .with_endpoint(endpoint.clone())
                .with_token(token)
                .with_progress(false)
                .with_retries(3)
                .with_user_agent("hone", env!("CARGO_PKG_VERSION"))
                .build();
            Some(built.context("setting up the Hub client")?)
        };
        Ok(Hub { cache_dir, api, endpoint })
    }

    fn repo_dir(&self, repo: &Repo) -> PathBuf {
        self.cache_dir.join(repo.folder_name())
    }

    /// The snapshot directory the cache holds for `revision` (a commit, or a branch or tag
    /// that `refs/` maps to one).
    fn cached_snapshot(&self, repo: &Repo, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let commit = if is_commit(revision) { revision.to_string() } else { std::fs::read_to_string(dir.join("refs").join(revision)).ok()?.trim().to_string() };
        let snap = dir.join("snapshots").join(commit);
        snap.is_dir().then_some(snap)
    }

    /// The files of `id`'s revision and its commit, asking the endpoint; None when offline
    /// or when the endpoint cannot be reached and the cache holds the revision.
    fn listing(&self, id: &HubId, kind: RepoType) -> anyhow::Result<Option<(Vec<String>, String)>> {
        let repo = Repo::with_revision(id.repo.clone(), kind, id.revision.clone());
        let Some(api) = &self.api else { return Ok(None) };
        match api.repo(repo.clone()).info() {
            Ok(info) => Ok(Some((info.siblings.into_iter().map(|s| s.rfilename).collect(), info.sha))),
            Err(e) => {
                if let (Some(snap), true) = (self.cached_snapshot(&repo, &id.revision), is_transport(&e)) {
                    eprintln!("warning: {} cannot be reached ({e}); using the cached {}", self.endpoint, snap.display());
                    return Ok(None);
                }
                Err(describe(e, id, &self.endpoint))
            }
        }
    }

    /// A model: its snapshot directory (config, tokenizer, safetensors) or, with `:FILE` or a
    /// repository of GGUF files only, the GGUF file.
    pub fn model(&self, id: &HubId, config_only: bool) -> anyhow::Result<PathBuf> {
        let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
        let Some((files, commit)) = self.listing(id, RepoType::Model)? else {
            return self.cached_model(id, &repo, config_only);
        };
        let wanted = model_files(id, &files, config_only)?;
        let snap = self.fetch(id, &repo, &commit, &wanted)?;
        Ok(match wanted.iter().find(|f| f.ends_with(".gguf")) {
            Some(g) => snap.join(g),
            None => snap,
        })
    }

    fn cached_model(&self, id: &HubId, repo: &Repo, config_only: bool) -> anyhow::Result<PathBuf> {
        let Some(snap) = self.cached_snapshot(repo, &id.revision) else {
            bail!("{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set", self.repo_dir(repo).display());
        };
        let files = list_dir(&snap);
        let wanted = model_files(id, &files, config_only).with_context(|| format!("{id}: the cached snapshot {}", snap.display()))?;
        if let Some(missing) = wanted.iter().find(|f| !snap.join(f).exists()) {
            bail!("{id}: the cached snapshot {} lacks {missing}", snap.display());
        }
        Ok(match wanted.iter().find(|f| f.ends_with(".gguf")) {
            Some(g) => snap.join(g),
            None => snap,
        })
    }

    /// A dataset split's files, downloaded or found in the cache.
    pub fn dataset(&self, id: &HubId, split: &str) -> anyhow::Result<Vec<PathBuf>> {
        let repo = Repo::with_revision(id.repo.clone(), RepoType::Dataset, id.revision.clone());
        let (files, snap) = match self.listing(id, RepoType::Dataset)? {
            Some((files, commit)) => {
                let wanted = split_files(id, &files, split)?;
                let snap = self.fetch(id, &repo, &commit, &wanted)?;
                (wanted, snap)
            }
            None => {
                let Some(snap) = self.cached_snapshot(&repo, &id.revision) else {
                    bail!("{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set", self.repo_dir(&repo).display());
                };
                (split_files(id, &list_dir(&snap), split)?, snap)
            }
        };
        Ok(files.iter().map(|f| snap.join(f)).collect())
    }

    /// Downloads what `snapshots/<commit>` lacks of `files`; its directory.
    fn fetch(&self, id: &HubId, repo: &Repo, commit: &str, files: &[String]) -> anyhow::Result<PathBuf> {
        let api = self.api.as_ref().expect("online");
        let snap = self.repo_dir(repo).join("snapshots").join(commit);
        // Pin the listed commit: a branch that moves between the listing and the downloads
        // must not mix two commits' files in one snapshot.
        let pinned = api.repo(Repo::with_revision(id.repo.clone(), repo_type(repo), commit.to_string()));
        for file in files {
            let local = snap.join(file);
            if local.exists() {
                continue;
            }
            download(&pinned, id, file, &local)?;
        }
        // As huggingface_hub: the branch or tag given points at the commit it resolved to.
        if !is_commit(&id.revision) {
            let refs = self.repo_dir(repo).join("refs").join(&id.revision);
            std::fs::create_dir_all(refs.parent().expect("refs/")).and_then(|()| std::fs::write(&refs, commit)).with_context(|| format!("writing {}", refs.display()))?;
        }
        Ok(snap)
    }
}

fn repo_type(repo: &Repo) -> RepoType {
    if repo.folder_name().starts_with("datasets--") {
        RepoType::Dataset
    } else {
        RepoType::Model
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_transport(e: &hf_hub::api::sync::ApiError) -> bool {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::RequestError(r) => matches!(**r, ureq::Error::Transport(_)),
        ApiError::IoError(_) => true,
        _ => false,
    }
}

/// A Hub error said the way a user can act on.
fn describe(e: hf_hub::api::sync::ApiError, id: &HubId, endpoint: &str) -> anyhow::Error {
    use hf_hub::api::sync::ApiError;
    if let ApiError::RequestError(r) = &e {
        if let ureq::Error::Status(code, _) = **r {
            let why = match code {
                401 | 403 => "access denied: a gated or private repository needs HF_TOKEN (or `huggingface-cli login`) with access to it",
                404 => "not found: check the id and the revision",
                _ => "the endpoint refused the request",
            };
            return anyhow::anyhow!("{id}: {endpoint} answered {code}, {why}");
        }
    }
    anyhow::anyhow!("{id}: {e} (endpoint {endpoint}; HF_HUB_OFFLINE=1 uses the cache alone)")
}

fn list_dir(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The files hone reads from a model repository: the config, tokenizer and safetensors
/// weights at its top level (with `config_only`, config.json alone); or one GGUF file.
fn model_files(id: &HubId, files: &[String], config_only: bool) -> anyhow::Result<Vec<String>> {
    let ggufs: Vec<&String> = files.iter().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).collect();
    if let Some(want) = &id.file {
        let hit: Vec<&&String> = match ggufs.iter().find(|f| **f == want) {
            Some(f) => vec![f],
            None => ggufs.iter().filter(|f| f.to_ascii_lowercase().contains(&want.to_ascii_lowercase())).collect(),
        };
        return match hit.as_slice() {
            [one] => Ok(vec![(**one).clone()]),
            [] if files.contains(want) => bail!("{id}: {want} is not a GGUF file; without :FILE hone reads the repository's safetensors"),
            [] => bail!("{id}: no GGUF file matches {want:?}; the repository holds {}", list_or_none(&ggufs)),
            many => bail!("{id}: {want:?} matches {} files: {}; name one", many.len(), many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
        };
    }
    let top = |f: &&String| !f.contains('/');
    let has = |name: &str| files.iter().any(|f| f == name);
    let safetensors: Vec<&String> = files.iter().filter(top).filter(|f| f.ends_with(".safetensors")).collect();
    if safetensors.is_empty() {
        return match ggufs.as_slice() {
            [one] => Ok(vec![(*one).clone()]),
            [] if files.iter().any(|f| f.ends_with(".bin")) => bail!("{id}: only PyTorch .bin weights; hone reads safetensors (convert them, or choose a repository with model.safetensors)"),
            [] => bail!("{id}: no safetensors weights and no GGUF file in the repository"),
            many => bail!("{id}: no safetensors weights but {} GGUF files; choose one with {id}:FILE ({})", many.len(), many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
        };
    }
    anyhow::ensure!(has("config.json"), "{id}: the repository has no config.json");
    if config_only {
        return Ok(vec!["config.json".into()]);
    }
    const SMALL: [&str; 9] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors.index.json",
    ];
    let mut out: Vec<String> = SMALL.iter().filter(|f| has(f)).map(|f| f.to_string()).collect();
    out.extend(safetensors.into_iter().cloned());
    Ok(out)
}

fn list_or_none(files: &[&String]) -> String {
    if files.is_empty() {
        "no GGUF file".into()
    } else {
        files.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    }
}

const DATA_EXTENSIONS: [&str; 4] = [".parquet", ".jsonl", ".json", ".csv"];

/// A split's data files, as the datasets library finds them without a loading script: files
/// named for the split (`train.jsonl`, `data/train-00000-of-00002.parquet`) or in a directory
/// named for it (`train/0000.parquet`); a repository with one data file and no split names
/// has it as its train split.
fn split_files(id: &HubId, files: &[String], split: &str) -> anyhow::Result<Vec<String>> {
    let data: Vec<&String> = files.iter().filter(|f| DATA_EXTENSIONS.iter().any(|e| f.to_ascii_lowercase().ends_with(e))).collect();
    if let Some(want) = &id.file {
        return match data.iter().find(|f| **f == want) {
            Some(f) => Ok(vec![(*f).clone()]),
            None => bail!("{id}: no data file {want}; the repository holds {}", data.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
        };
    }
    let named = |f: &str, s: &str| {
        let parts: Vec<&str> = f.split('/').collect();
        let stem = parts.last().map(|n| n.split('.').next().unwrap_or(n)).unwrap_or("");
        parts[..parts.len() - 1].contains(&s) || stem == s || stem.starts_with(&format!("{s}-")) || stem.starts_with(&format!("{s}_"))
    };
    let mut hit: Vec<String> = data.iter().filter(|f| named(f, split)).map(|f| (*f).clone()).collect();
    if hit.is_empty() && split == "train" && data.len() == 1 && !["test", "validation", "valid", "dev"].iter().any(|s| named(data[0], s)) {
        hit.push(data[0].clone());
    }
    if hit.is_empty() {
        let splits: std::collections::BTreeSet<&str> = ["train", "test", "validation", "valid", "dev", "eval"].into_iter().filter(|s| data.iter().any(|f| named(f, s))).collect();
        bail!(
            "{id}: no data files for split {split:?}{}",
            if splits.is_empty() { format!(" among {} data files", data.len()) } else { format!("; splits found: {}", splits.into_iter().collect::<Vec<_>>().join(", ")) }
        );
    }
    // One format per split (a repository converted to Parquet may keep its JSON too).
    for ext in DATA_EXTENSIONS {
        let same: Vec<String> = hit.iter().filter(|f| f.to_ascii_lowercase().ends_with(ext)).cloned().collect();
        if !same.is_empty() {
            return Ok(same);
        }
    }
    Ok(hit)
}

/// Downloads one file into the cache with a progress bar (bytes, rate, time left), then
/// checks an LFS blob against the sha256 its name is.
fn download(repo: &ApiRepo, id: &HubId, file: &str, local: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = Bar::new();
    let path = repo.download_with_progress(file, bar).map_err(|e| match e {
        hf_hub::api::sync::ApiError::TooManyRetries(inner) => anyhow::anyhow!("{id}: downloading {file}: {inner} (the partial download is kept; run again to resume)"),
        e => anyhow::anyhow!("{id}: downloading {file}: {e}"),
    })?;
    let blob = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
    let name = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let got = sha256(&blob)?;
        if !got.eq_ignore_ascii_case(&name) {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&blob);
            bail!("{id}: {file} is damaged: its sha256 is {got}, the Hub's is {name}; the blob was removed, run again to download it anew");
        }
    }
    let size = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    eprintln!("downloaded {file}: {} in {secs:.1} s ({}/s) → {}", indicatif::HumanBytes(size), indicatif::HumanBytes((size as f64 / secs) as u64), local.display());
    Ok(())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// hf-hub's progress callbacks on an indicatif bar (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Bar {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(0) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("template"));
        Bar(bar)
    }
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!((id.repo.as_str(), id.revision.as_str(), id.file.as_deref()), ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None));
        let id = HubId::parse("org/name@v1.0:model-Q4_K_M.gguf").unwrap();
        assert_eq!((id.revision.as_str(), id.file.as_deref()), ("v1.0", Some("model-Q4_K_M.gguf")));
        assert_eq!(id.to_string(), "org/name@v1.0:model-Q4_K_M.gguf");
        for bad in ["name", "org/", "/name", "a/b/c", "org/name@", "org/name:", "../x", "org/model.gguf", "./a/b"] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn model_file_choice() {
        let id = HubId::parse("o/m").unwrap();
        let files = strings(&[".gitattributes", "README.md", "config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "onnx/model.safetensors", "generation_config.json"]);
        assert_eq!(model_files(&id, &files, false).unwrap(), strings(&["config.json", "generation_config.json", "tokenizer.json", "model.safetensors"]));
        let ggufs = strings(&["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf"]);
        let e = model_files(&id, &ggufs, false).unwrap_err().to_string();
        assert!(e.contains("2 GGUF files") && e.contains("m-Q8_0.gguf"), "{e}");
        let id = HubId::parse("o/m:q8_0").unwrap();
        assert_eq!(model_files(&id, &ggufs, false).unwrap(), strings(&["m-Q8_0.gguf"]));
        let e = model_files(&HubId::parse("o/m").unwrap(), &strings(&["config.json", "pytorch_model.bin"]), false).unwrap_err().to_string();
        assert!(e.contains(".bin"), "{e}");
    }

    #[test]
    fn split_choice() {
        let id = HubId::parse("o/d").unwrap();
        let files = strings(&["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]);
        assert_eq!(split_files(&id, &files, "train").unwrap().len(), 2);
        assert_eq!(split_files(&id, &files, "test").unwrap(), strings(&["data/test-00000-of-00001.parquet"]));
        let e = split_files(&id, &files, "validation").unwrap_err().to_string();
        assert!(e.contains("splits found: test, train"), "{e}");
        assert_eq!(split_files(&id, &strings(&["rows.jsonl"]), "train").unwrap(), strings(&["rows.jsonl"]));
        let both = strings(&["train.jsonl", "train/0000.parquet"]);
        assert_eq!(split_files(&id, &both, "train").unwrap(), strings(&["train/0000.parquet"]));
    }
}
