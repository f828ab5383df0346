//! Target selection as PEFT does it, and PEFT's initialisation (A ~ U(±1/√in), B = 0), seeded.

use burn::backend::NdArray;
use hone::lora::{LoraConfig, Targets};

#[test]
fn targets_match_like_peft() {
    let list = Targets::parse("q_proj,v_proj");
    assert!(list.matches("model.layers.0.self_attn.q_proj"));
    assert!(list.matches("q_proj"));
    assert!(!list.matches("model.layers.0.self_attn.qq_proj"));
    assert!(!list.matches("model.layers.0.self_attn.k_proj"));
    let fused = Targets::parse("qkv_proj,gate_up_proj");
    assert!(fused.matches("model.layers.3.self_attn.qkv_proj") && fused.matches("model.layers.3.mlp.gate_up_proj"));
    let re = Targets::parse(r"model\.layers\.[01]\..*(q|v)_proj");
    assert!(matches!(re, Targets::Regex(_)));
    assert!(re.matches("model.layers.1.self_attn.v_proj"));
    assert!(!re.matches("model.layers.2.self_attn.v_proj"));
    assert!(!re.matches("xmodel.layers.1.self_attn.v_proj"), "a regex must match the whole name");
    assert_eq!(Targets::parse("all-linear"), Targets::AllLinear);
}

#[test]
fn init_is_kaiming_uniform_and_zero_b_and_seeded() {
    let device = Default::default();
    let cfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 3 };
    let lora = cfg.init::<NdArray>(5, 48, 300, &device);
    let a = lora.lora_a.val().into_data().to_vec::<f32>().unwrap();
    let b = lora.lora_b.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(lora.lora_a.dims(), [8, 300]);
    assert_eq!(lora.lora_b.dims(), [48, 8]);
    let bound = 1.0 / 300f32.sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    // Spread over the whole interval, mean near zero.
    assert!(a.iter().any(|v| *v > 0.9 * bound) && a.iter().any(|v| *v < -0.9 * bound));
    assert!((a.iter().sum::<f32>() / a.len() as f32).abs() < 0.05 * bound);
    assert!(b.iter().all(|v| *v == 0.0));
    assert_eq!(lora.scaling, 2.0);
    let again = cfg.init::<NdArray>(5, 48, 300, &device).lora_a.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(a, again, "same seed and layer, same values");
    let other = cfg.init::<NdArray>(6, 48, 300, &device).lora_a.val().into_data().to_vec::<f32>().unwrap();
    assert_ne!(a, other, "another layer draws other values");
    let rs = LoraConfig { use_rslora: true, ..cfg };
    assert!((rs.scaling() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
}
