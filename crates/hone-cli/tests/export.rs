//! `hone export --gguf`: the command writes the llama.cpp LoRA GGUF that hone's library makes
//! (itself checked against llama.cpp in crates/hone/tests/llamacpp.rs), and says what it wrote.

use hone::export::gguf_lora::lora_to_gguf;
use hone::io::Dir;
use hone::lora::peft::Adapter;
use hone::model::load::read_config;
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn export_writes_the_llama_cpp_lora_gguf() {
    let adapter = fixtures().join("llamacpp/qwen2_adapter");
    let out = std::env::temp_dir().join(format!("hone-export-{}", std::process::id())).join("qwen2_adapter.gguf");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["export", "--adapter"])
        .arg(&adapter)
        .arg("--model")
        .arg(fixtures().join("qwen2"))
        .arg("--gguf")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let want = lora_to_gguf(&Adapter::read(&Dir(adapter)).unwrap(), &read_config(&Dir(fixtures().join("qwen2"))).unwrap(), "qwen2_adapter").unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), want.bytes);
    // The rsLoRA adapter: the command says which alpha it wrote and why.
    assert!(stderr.contains("rsLoRA") && stderr.contains("adapter.lora.alpha 16"), "{stderr}");
    // Nothing left beside it but the file.
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
    std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
}

#[test]
fn export_for_the_wrong_base_fails_naming_the_module_and_writes_nothing() {
    let out = std::env::temp_dir().join(format!("hone-export-bad-{}.gguf", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["export", "--adapter"])
        .arg(fixtures().join("llamacpp/llama_adapter"))
        .arg("--model")
        .arg(fixtures().join("phi3"))
        .arg("--gguf")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("model.layers.0.mlp.gate_proj") && stderr.contains("another model"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn check_adapter_exits_1_only_when_a_runtime_refuses() {
    let check = |extra: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_hone")).arg("check-adapter").arg(fixtures().join("llamacpp/qwen2_adapter")).args(extra).output().unwrap();
        (run.status.code(), String::from_utf8_lossy(&run.stdout).into_owned())
    };
    // rsLoRA: llama.cpp reads it otherwise (a note), nothing refuses it.
    let (code, out) = check(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("vllm: ok") && out.contains("llama.cpp: differs: rsLoRA") && out.contains("peft: ok"), "{out}");
    // A vLLM server at --max-lora-rank 1 refuses rank 4.
    let (code, out) = check(&["--for", "vllm", "--max-lora-rank", "1"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("vllm: refuses: rank 4") && !out.contains("llama.cpp"), "{out}");
}

/// `hone merge --gguf` writes, atomically, the file hone's library streams (itself checked
/// against llama.cpp in crates/hone/tests/gguf_merge.rs and gguf_hf.rs), from a GGUF base and
/// from a Hugging Face one.
#[test]
fn merge_gguf_writes_the_merged_file_from_a_gguf_or_a_hugging_face_base() {
    use hone::export::gguf_merge::{merge_gguf, MergedType};
    use hone::io::gguf::Gguf;
    use hone::io::FileSource;
    let base_path = std::env::var_os("HONE_DEFAULT_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/hone/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(base_path.exists(), "{}: run `cargo xtask default-model`", base_path.display());
    let adapter_dir = fixtures().join("llamacpp/smollm2_adapter");
    let work = std::env::temp_dir().join(format!("hone-merge-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("merged.gguf");
    let run = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["merge", "--type", "q4_0", "--model"])
        .arg(&base_path)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--gguf")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let base = Gguf::open(Box::new(FileSource::open(&base_path).unwrap())).unwrap();
    let mut want = Vec::new();
    merge_gguf(&base, &Adapter::read(&Dir(adapter_dir)).unwrap(), MergedType::Q4_0, &mut |b| {
        want.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == want, "the command's file differs from the library's");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1, "no temp file left");
    // A Hugging Face base: written as llama.cpp's converter writes one (crates/hone/tests/gguf_hf.rs).
    let hf = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["merge", "--model"])
        .arg(fixtures().join("llama"))
        .arg("--adapter")
        .arg(fixtures().join("llamacpp/llama_adapter"))
        .args(["--type", "q8_0", "--name", "tiny", "--gguf"])
        .arg(work.join("hf.gguf"))
        .output()
        .unwrap();
    assert!(hf.status.success(), "{}", String::from_utf8_lossy(&hf.stderr));
    let mut want = Vec::new();
    hone::export::gguf_hf::hf_to_gguf(&Dir(fixtures().join("llama")), Some(&Adapter::read(&Dir(fixtures().join("llamacpp/llama_adapter"))).unwrap()), MergedType::Q8_0, "tiny", &mut |b| {
        want.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    assert!(std::fs::read(work.join("hf.gguf")).unwrap() == want, "the command's file differs from the library's");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 2, "no temp file left");
    std::fs::remove_dir_all(&work).unwrap();
}
