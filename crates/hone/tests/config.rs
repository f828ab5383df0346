//! config.json in transformers 4.x and 5.x styles gives the same normalised config.

mod common;

use hone::model::{Config, Rope};

fn load(arch: &str) -> Config {
    let path = common::fixtures().join(arch).join("config.json");
    Config::from_json(&std::fs::read(&path).unwrap(), &path.display().to_string()).unwrap()
}

#[test]
fn v4_and_v5_styles_agree() {
    let v4 = load("llama3"); // rewritten in 4.x style by the reference script
    let v5_text = serde_json::json!({
        "model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0,
        "tie_word_embeddings": false, "dtype": "bfloat16", "head_dim": 16,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    });
    let v5 = Config::from_json(&serde_json::to_vec(&v5_text).unwrap(), "v5.json").unwrap();
    assert_eq!(v4, v5);
    assert_eq!(v4.rope_theta, 500000.0);
    assert!(matches!(v4.rope, Rope::Llama3 { original_max_position_embeddings: 16, .. }));
    assert_eq!(v4.dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn phi3_longrope_attention_factor() {
    let c = load("phi3");
    match c.rope {
        Rope::LongRope { attention_factor, original_max_position_embeddings, .. } => {
            assert_eq!(original_max_position_embeddings, 8);
            // transformers: sqrt(1 + ln(32 / 8) / ln(8))
            assert!((attention_factor - (1.0 + 4f64.ln() / 8f64.ln()).sqrt()).abs() < 1e-12);
        }
        other => panic!("expected longrope, got {other:?}"),
    }
}
