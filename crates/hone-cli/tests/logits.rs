//! `hone logits` writes the transformers-equal logits to a safetensors file, from ids or text.

use hone::io::safetensors::SafeTensors;
use hone::io::FileSource;
use hone::parity::{read_ids, rel_error};
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn open(path: &std::path::Path) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(path).unwrap())).unwrap()
}

#[test]
fn logits_from_ids_match_fixture() {
    let dir = fixtures().join("qwen2");
    let expected = open(&dir.join("expected.safetensors"));
    let ids = read_ids(&expected, "ids_1").unwrap();
    let out = std::env::temp_dir().join(format!("hone-logits-{}.safetensors", std::process::id()));
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let status = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["logits", "--model"])
        .arg(&dir)
        .args(["--input-ids", &ids_arg, "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = open(&out);
    let (shape, ours) = got.read_f32("logits").unwrap();
    assert_eq!(shape, vec![ids.len(), 384]);
    let (_, reference) = expected.read_f32("logits_1").unwrap();
    assert!(rel_error(&ours, &reference) < 1e-4);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn logits_from_text_tokenizes_first() {
    let dir = fixtures().join("llama");
    let out = std::env::temp_dir().join(format!("hone-text-{}.safetensors", std::process::id()));
    // The fixture's first input is the tokenization of this text.
    let status = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["logits", "--model"])
        .arg(&dir)
        .args(["--text", "Paris is the capital", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let (_, ours) = open(&out).read_f32("logits").unwrap();
    let (_, reference) = open(&dir.join("expected.safetensors")).read_f32("logits_0").unwrap();
    assert!(rel_error(&ours, &reference) < 1e-4);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn bad_model_dir_is_a_clear_error() {
    let out = std::env::temp_dir().join("hone-never-written.safetensors");
    let result = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["logits", "--model", "/nonexistent/model", "--input-ids", "1,2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("/nonexistent/model: no such file or directory"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn adapter_flag_applies_a_peft_adapter() {
    let fixtures = fixtures();
    let expected = open(&fixtures.join("lora/phi3_adapter_logits.safetensors"));
    let ids = read_ids(&expected, "ids").unwrap();
    let out = std::env::temp_dir().join(format!("hone-adapter-{}.safetensors", std::process::id()));
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let status = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["logits", "--model"])
        .arg(fixtures.join("phi3"))
        .arg("--adapter")
        .arg(fixtures.join("lora/phi3_peft_adapter"))
        .args(["--input-ids", &ids_arg, "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let (_, ours) = open(&out).read_f32("logits").unwrap();
    let (_, peft) = expected.read_f32("peft_adapter.logits").unwrap();
    assert!(rel_error(&ours, &peft) < 1e-4);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn merge_command_writes_a_model_directory() {
    let fixtures = fixtures();
    let out = std::env::temp_dir().join(format!("hone-merge-cli-{}", std::process::id()));
    let result = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["merge", "--model"])
        .arg(fixtures.join("llama"))
        .arg("--adapter")
        .arg(fixtures.join("lora/llama_hone_adapter"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(String::from_utf8_lossy(&result.stderr).contains("merged 6 adapted layers"));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn generate_with_the_default_model_answers() {
    // `cargo xtask test` fetches the default model (SmolLM2-135M-Instruct) first.
    let result = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let out = String::from_utf8_lossy(&result.stdout);
    assert!(out.contains("Paris"), "{out}");
}
