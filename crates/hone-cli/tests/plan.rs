//! `hone plan` on the real default model (SmolLM2-135M, read from the GGUF header only): its
//! LoRA count must be what PEFT reports for r=16 on all linear layers
//! (`print_trainable_parameters`: 4,884,480), and a bad model path is a clear error.

use std::process::Command;

fn hone() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hone"))
}

#[test]
fn plan_counts_peft_trainable_parameters_for_smollm2() {
    // No --model: the default model (HONE_DEFAULT_MODEL, set by `cargo xtask test`, or the cache).
    let out = hone().args(["plan", "--rank", "16", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["lora_params"], 4_884_480);
    assert_eq!(v["lora_bytes"], 4_884_480u64 * 16);
    // At the default batch 4 × 512 tokens the f32 logits (49152 wide) outgrow the tied
    // 49152 × 576 embedding.
    assert_eq!(v["largest_buffer"], "logits");
    assert_eq!(v["largest_buffer_bytes"], 4u64 * 512 * 49152 * 4);
}

#[test]
fn plan_of_a_missing_model_names_the_file() {
    let out = hone().args(["plan", "--model", "/nonexistent/model"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}
