//! `hone check-adapter`'s findings: each case vLLM, llama.cpp or PEFT refuses or reads
//! differently is flagged for that runtime, and a plain adapter is flagged for none.

mod common;

use hone::export::check::{check_adapter, Finding, Runtime, Verdict};
use hone::io::safetensors::{write_f32, SafeTensors};
use hone::io::{FileSource, MemFiles};
use hone::lora::peft::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use serde_json::{json, Value};

fn base_dir() -> std::path::PathBuf {
    common::fixtures().join("llamacpp/llama_adapter")
}

/// The llama fixture adapter with `patch` merged into its config and `extra` tensors added
/// (`rank` ≠ None re-shapes every lora_A/lora_B to that rank).
fn variant(patch: Value, extra: &[(&str, Vec<usize>)], rank: Option<usize>) -> MemFiles {
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(base_dir().join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let st = SafeTensors::open(Box::new(FileSource::open(&base_dir().join(ADAPTER_WEIGHTS_FILE)).unwrap())).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for name in st.tensors().keys() {
        let (mut shape, mut values) = st.read_f32(name).unwrap();
        if let Some(r) = rank {
            if name.contains("lora_A") {
                shape[0] = r;
            } else {
                shape[1] = r;
            }
            values = vec![0.01; shape.iter().product()];
        }
        tensors.push((name.clone(), shape, values));
    }
    for (name, shape) in extra {
        tensors.push((name.to_string(), shape.clone(), vec![1.0; shape.iter().product()]));
    }
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    MemFiles::new("adapter")
        .with(ADAPTER_CONFIG_FILE, serde_json::to_vec(&cfg).unwrap())
        .with(ADAPTER_WEIGHTS_FILE, write_f32(&refs, &Default::default()))
}

fn findings(files: &MemFiles, rt: Runtime) -> Vec<Finding> {
    check_adapter(files, &[rt], 16).unwrap()
}

/// Exactly one finding, of this verdict, whose message holds `words`.
fn flags(files: &MemFiles, rt: Runtime, verdict: Verdict, words: &[&str]) {
    let f = findings(files, rt);
    assert_eq!(f.len(), 1, "{rt}: {f:#?}");
    assert_eq!(f[0].verdict, verdict, "{rt}: {f:#?}");
    for w in words {
        assert!(f[0].message.contains(w), "{rt}: {:?} lacks {w:?}", f[0].message);
    }
}

#[test]
fn a_plain_adapter_is_fine_everywhere() {
    let f = check_adapter(&variant(json!({}), &[], None), &Runtime::ALL, 16).unwrap();
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn vllm_refuses_dora() {
    let mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    flags(&variant(json!({"use_dora": true}), &[(mag, vec![64])], None), Runtime::Vllm, Verdict::Refuses, &["DoRA", "hone merge"]);
    // The magnitude tensors alone give it away, whatever the config says.
    flags(&variant(json!({}), &[(mag, vec![64])], None), Runtime::Vllm, Verdict::Refuses, &["DoRA"]);
}

#[test]
fn vllm_refuses_modules_to_save() {
    flags(&variant(json!({"modules_to_save": ["lm_head"]}), &[], None), Runtime::Vllm, Verdict::Refuses, &["modules_to_save", "lm_head"]);
}

#[test]
fn vllm_refuses_biases() {
    flags(&variant(json!({"bias": "all"}), &[], None), Runtime::Vllm, Verdict::Refuses, &["bias", "\"all\""]);
    let bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias";
    flags(&variant(json!({"lora_bias": true}), &[(bias, vec![64])], None), Runtime::Vllm, Verdict::Refuses, &["lora_bias"]);
}

#[test]
fn vllm_refuses_a_rank_above_its_max_lora_rank() {
    let files = variant(json!({"r": 32}), &[], Some(32));
    flags(&files, Runtime::Vllm, Verdict::Refuses, &["rank 32", "max_lora_rank 16", "--max-lora-rank 32"]);
    // A server started with a large enough --max-lora-rank takes it.
    assert!(check_adapter(&files, &[Runtime::Vllm], 64).unwrap().is_empty());
    let files = variant(json!({"r": 24}), &[], Some(24));
    flags(&files, Runtime::Vllm, Verdict::Refuses, &["rank 24", "--max-lora-rank 32"]);
}

#[test]
fn vllm_refuses_an_unconverted_pissa_adapter() {
    flags(&variant(json!({"init_lora_weights": "pissa_niter_4"}), &[], None), Runtime::Vllm, Verdict::Refuses, &["pissa_niter_4", "converted"]);
}

#[test]
fn llama_cpp_scales_rslora_otherwise() {
    // r 4, alpha 8: PEFT's rsLoRA scale 8/2 = 4, llama.cpp's 8/4 = 2; hone writes alpha 16.
    flags(&variant(json!({"use_rslora": true}), &[], None), Runtime::LlamaCpp, Verdict::Differs, &["alpha / r = 2", "sqrt(r) = 4", "alpha 16"]);
}

#[test]
fn llama_cpp_refuses_dora() {
    let mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    flags(&variant(json!({"use_dora": true}), &[(mag, vec![64])], None), Runtime::LlamaCpp, Verdict::Refuses, &["DoRA", "merge"]);
}

#[test]
fn llama_cpp_refuses_modules_to_save_and_reads_alpha_pattern_otherwise() {
    let saved = "base_model.model.lm_head.modules_to_save.default.weight";
    flags(&variant(json!({"modules_to_save": ["lm_head"]}), &[(saved, vec![384, 64])], None), Runtime::LlamaCpp, Verdict::Refuses, &["modules_to_save"]);
    flags(&variant(json!({"alpha_pattern": {"q_proj": 32}}), &[], None), Runtime::LlamaCpp, Verdict::Differs, &["alpha_pattern"]);
}

#[test]
fn peft_flags_ranks_and_targets_that_disagree_with_the_tensors() {
    // r says 8, the tensors have rank 4.
    let f = findings(&variant(json!({"r": 8}), &[], None), Runtime::Peft);
    assert_eq!(f.len(), 14, "{f:#?}");
    assert!(f.iter().all(|x| x.verdict == Verdict::Refuses && x.message.contains("rank 8")), "{f:#?}");
    // target_modules that miss the MLP: PEFT ignores those tensors.
    let f = findings(&variant(json!({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}), &[], None), Runtime::Peft);
    assert_eq!(f.len(), 6, "{f:#?}");
    assert!(f.iter().all(|x| x.verdict == Verdict::Differs && x.message.contains("mlp") && x.message.contains("ignores")), "{f:#?}");
}
