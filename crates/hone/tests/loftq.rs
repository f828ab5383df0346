//! LoftQ for QLoRA (PEFT's `replace_lora_weights_loftq`) against PEFT
//! (tests/reference/make_loftq_fixtures.py): A and B from the SVD of the NF4 error (signs of
//! singular vectors normalised), the QLoRA model's logits with them, and LoftQ bringing the NF4
//! model nearer the original one; PEFT loads hone's LoftQ adapter and gives hone's logits.

mod common;

use burn::backend::NdArray;
use hone::io::safetensors::SafeTensors;
use hone::io::weights::Weights;
use hone::io::{Dir, FileSource};
use hone::lora::init::Init;
use hone::lora::peft::{Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use hone::lora::LoraConfig;
use hone::model::init_source::InitSource;
use hone::model::load::{build, read_config};
use hone::model::{CausalLm, LoadOptions, Nf4Options};
use hone::parity::{read_ids, rel_error};

fn expected(arch: &str) -> SafeTensors {
    let path = common::fixtures().join("loftq").join(format!("{arch}.safetensors"));
    SafeTensors::open(Box::new(FileSource::open(&path).unwrap())).unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig { r: 4, alpha: 4.0, dropout: 0.0, init: Init::Loftq, ..Default::default() }
}

/// The fixture model as QLoRA loads it, and LoftQ's initial adapter.
fn loftq_model(arch: &str) -> (CausalLm<NdArray>, Adapter, (f64, f64)) {
    let files = Dir(common::fixtures().join(arch));
    let weights = Weights::open(&files).unwrap();
    let nf4 = Some(Nf4Options::default());
    let source = InitSource::new(&weights, &lora(), nf4).unwrap();
    let model = build::<NdArray>(read_config(&files).unwrap(), &source, LoadOptions { nf4 }, &Default::default()).unwrap();
    let errors = source.loftq_errors().unwrap();
    (model, source.initial(&format!("tests/fixtures/{arch}")), errors)
}

fn logits(model: &CausalLm<NdArray>, ids: &[u32]) -> Vec<f32> {
    model.logits(ids).into_data().to_vec::<f32>().unwrap()
}

#[test]
fn loftq_init_and_logits_equal_pefts() {
    for arch in ["llama", "phi3"] {
        let (mut model, initial, (before, after)) = loftq_model(arch);
        let e = expected(arch);
        assert_eq!(initial.layers.len(), model.linears().len() - 1, "{arch}: every decoder linear");
        let mut worst = 0f64;
        for l in &initial.layers {
            let (_, a) = e.read_f32(&format!("base_model.model.{}.lora_A.weight", l.module)).unwrap();
            let (_, b) = e.read_f32(&format!("base_model.model.{}.lora_B.weight", l.module)).unwrap();
            let err = common::svd_pair_error(l, &a, &b);
            assert!(err < 5e-4, "{arch} {}: A/B {err:.3e}", l.module);
            worst = worst.max(err);
        }
        let ids = read_ids(&e, "ids").unwrap();
        let nf4 = logits(&model, &ids);
        initial.attach(model.linears_mut()).unwrap();
        let loftq = logits(&model, &ids);
        let (_, want_nf4) = e.read_f32("nf4.logits").unwrap();
        let (_, want_loftq) = e.read_f32("loftq.logits").unwrap();
        let (_, full) = e.read_f32("full.logits").unwrap();
        let (err_nf4, err_loftq) = (rel_error(&nf4, &want_nf4), rel_error(&loftq, &want_loftq));
        let (gap_nf4, gap_loftq) = (rel_error(&nf4, &full), rel_error(&loftq, &full));
        println!(
            "{arch}: A/B worst {worst:.2e}; logits vs PEFT: NF4 {err_nf4:.2e}, NF4 + LoftQ {err_loftq:.2e}; vs the f32 model: NF4 {gap_nf4:.3e}, NF4 + LoftQ {gap_loftq:.3e}; weight error {before:.3e} -> {after:.3e}"
        );
        assert!(err_nf4 < 1e-5 && err_loftq < 1e-5, "{arch}: {err_nf4:.3e} {err_loftq:.3e}");
        assert!(gap_loftq < gap_nf4 && after < before, "{arch}: LoftQ must bring the model nearer the original");
    }
}

#[test]
fn loftq_needs_an_nf4_base_and_writes_a_plain_lora() {
    let files = Dir(common::fixtures().join("llama"));
    let weights = Weights::open(&files).unwrap();
    let err = InitSource::new(&weights, &lora(), None).err().unwrap().to_string();
    assert!(err.contains("--quantize nf4"), "{err}");
    let (_, initial, _) = loftq_model("llama");
    // PEFT's replace_lora_weights_loftq leaves the config as a default LoRA's: the adapter belongs
    // on NF4(W), the base every QLoRA user loads.
    let cfg: serde_json::Value = serde_json::from_slice(&initial.config_json()).unwrap();
    assert_eq!(cfg["init_lora_weights"], serde_json::json!(true), "{cfg}");
}

#[test]
#[ignore = "writes the committed fixture; run with --ignored, then tests/reference/make_loftq_fixtures.py"]
fn write_hone_loftq_fixtures() {
    for arch in ["llama", "phi3"] {
        let (_, initial, _) = loftq_model(arch);
        let out = common::fixtures().join("loftq").join(format!("{arch}_hone_adapter"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(ADAPTER_CONFIG_FILE), initial.config_json()).unwrap();
        std::fs::write(out.join(ADAPTER_WEIGHTS_FILE), initial.weights_bytes()).unwrap();
    }
}

#[test]
fn hones_loftq_adapter_in_peft_gives_hones_logits() {
    for arch in ["llama", "phi3"] {
        let dir = common::fixtures().join("loftq").join(format!("{arch}_hone_adapter"));
        let committed = Adapter::read(&Dir(dir)).unwrap();
        let (mut model, _, _) = loftq_model(arch);
        committed.attach(model.linears_mut()).unwrap();
        let e = expected(arch);
        let ids = read_ids(&e, "ids").unwrap();
        let err = rel_error(&logits(&model, &ids), &e.read_f32("hone_adapter.logits").unwrap().1);
        println!("{arch}: hone's LoftQ adapter on the NF4 base, hone vs PEFT: {err:.2e}");
        assert!(err < 1e-5, "{arch}: {err:.3e}");
    }
}

/// PEFT's LoftQ starts only the linears bitsandbytes quantized: an lm_head among the targets
/// (kept in the checkpoint's precision) keeps the default start.
#[test]
fn loftq_leaves_an_unquantized_lm_head_at_the_default_start() {
    let files = Dir(common::fixtures().join("llama"));
    let weights = Weights::open(&files).unwrap();
    let lora = LoraConfig { targets: hone::lora::Targets::parse("q_proj,lm_head"), ..lora() };
    let nf4 = Some(Nf4Options::default());
    let source = InitSource::new(&weights, &lora, nf4).unwrap();
    build::<NdArray>(read_config(&files).unwrap(), &source, LoadOptions { nf4 }, &Default::default()).unwrap();
    let initial = source.initial("llama");
    assert_eq!(initial.layers.len(), 2, "the two layers' q_proj: {:?}", initial.layers.iter().map(|l| &l.module).collect::<Vec<_>>());
    assert!(initial.layers.iter().all(|l| l.module.ends_with("self_attn.q_proj")), "{:?}", initial.layers.iter().map(|l| &l.module).collect::<Vec<_>>());
}
