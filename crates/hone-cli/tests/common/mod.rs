//! Helpers the CLI's test files share: the fixtures, a fresh scratch folder, a small dataset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// An empty folder of its own under the system's temporary folder.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hone-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Twelve prompt/completion rows of sums, as data.jsonl in `dir`.
pub fn write_data(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..12).map(|i| format!("{{\"prompt\": \"Q{i}: {i}+{i}?\", \"completion\": \" {}\"}}", 2 * i)).collect();
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}
