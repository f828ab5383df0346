//! The memory plan works from config.json alone; its list of decoder linears must be the one
//! the loaded model has (names and shapes), for every architecture, or its LoRA and NF4 counts
//! are wrong. And its NF4 size must be what the device actually stores.

mod common;

use burn::backend::NdArray;
use hone::io::Dir;
use hone::lora::{LoraConfig, Targets};
use hone::model::{load_model, LoadOptions, Nf4Options};
use hone::train::plan::{estimate, linear_shapes};

type B = NdArray;

#[test]
fn planned_linears_are_the_models_linears() {
    let device = Default::default();
    for arch in common::ARCHS {
        let dir = Dir(common::fixtures().join(arch));
        let config = hone::model::load::read_config(&dir).unwrap();
        let model = load_model::<B>(&dir, &device).unwrap();
        let mut actual: Vec<(String, u64, u64)> = model
            .linears()
            .into_iter()
            .filter(|(n, _)| n != "lm_head")
            .map(|(n, l)| {
                let [out, inp] = l.weight.dims();
                (n, inp as u64, out as u64)
            })
            .collect();
        let mut planned = linear_shapes(&config);
        actual.sort();
        planned.sort();
        assert_eq!(planned, actual, "{arch}");
    }
}

#[test]
fn lora_parameters_and_nf4_bytes_match_the_built_model() {
    let device = Default::default();
    let dir = Dir(common::fixtures().join("llama"));
    let config = hone::model::load::read_config(&dir).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::parse("q_proj,v_proj"), use_rslora: false, use_dora: false, init: Default::default(), seed: 1 };
    let mut model = hone::model::load_model_with::<B>(&dir, LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    hone::lora::peft::add_adapters(model.linears_mut(), &lora);
    let lora_params: u64 = model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .map(|l| (l.lora_a.val().dims().iter().product::<usize>() + l.lora_b.val().dims().iter().product::<usize>()) as u64)
        .sum();
    let plan = estimate(&config, &lora, 2, 16, true);
    assert_eq!(plan.lora_params, lora_params);
    assert_eq!(plan.lora_bytes, lora_params * 16);
    let stored: u64 = model
        .linears()
        .iter()
        .filter(|(n, _)| n != "lm_head")
        .map(|(_, l)| {
            l.weight.nf4.as_ref().expect("quantized").bytes()
        })
        .sum();
    let planned: u64 = linear_shapes(&config).iter().map(|(_, i, o)| hone::train::plan::nf4_bytes(i * o)).sum();
    assert_eq!(planned, stored);
}
