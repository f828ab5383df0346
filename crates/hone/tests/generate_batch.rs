//! Batched generation (prompts of different lengths left-padded into one batch, finished prompts
//! leaving it) gives every prompt the tokens it gets alone: greedy and sampled, on every
//! architecture (Mistral's sliding window and Phi-3's LongRoPE, whose factors switch with the
//! length, included), with a LoRA adapter, with NF4, and on wgpu.

mod common;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::wgpu::WgpuDevice;
use burn::backend::{NdArray, Wgpu};
use hone::generate::{generate, generate_batch, GenerateConfig, Generator};
use hone::io::Dir;
use hone::model::{load_model, load_model_with, CausalLm, LoadOptions, Nf4Options};
use hone::ops::HoneBackend;
use hone::parity::rel_error;

/// Prompts of 1 to 12 tokens (Phi-3's fixture switches LongRoPE factors past 8 positions).
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [5usize, 12, 1, 8, 3, 9].iter().enumerate().map(|(r, &n)| (0..n).map(|i| ((i * 7 + r * 13 + 2) % vocab) as u32).collect()).collect()
}

/// Each prompt alone and all in batches of `batch` give the same tokens; returns the outputs.
fn check<B: HoneBackend>(label: &str, model: &CausalLm<B>, cfg: &GenerateConfig, batch: usize) -> Vec<Vec<u32>> {
    let prompts = prompts(model.config.vocab_size);
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| generate(model, p, cfg)).collect();
    let batched = generate_batch(model, &prompts, cfg, batch);
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "{label}: prompt {i} ({} tokens), batch {batch}", prompts[i].len());
    }
    println!("{label}, batch {batch}: {:?}", batched.iter().map(Vec::len).collect::<Vec<_>>());
    alone
}

fn greedy(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens, ..Default::default() }
}

#[test]
fn batched_greedy_tokens_equal_one_at_a_time_on_every_architecture() {
    let device = NdArrayDevice::Cpu;
    for arch in common::ARCHS {
        let model = load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
        // Phi-3's fixture holds 32 positions: 12 + 16 stays inside.
        let out = check(arch, &model, &greedy(16), 6);
        check(arch, &model, &greedy(16), 4);
        // A stop token that one prompt meets early and another never: rows leave the batch at
        // different steps.
        let fresh = |k: usize| !out[0][..k].contains(&out[0][k]) && out.iter().any(|o| !o.contains(&out[0][k]));
        let stop = out[0][(2..16).find(|&k| fresh(k)).or_else(|| (0..16).find(|&k| fresh(k))).expect("a token not in every reply")];
        let stopped = check(arch, &model, &GenerateConfig { stop_ids: vec![stop], ..greedy(16) }, 6);
        let lengths: Vec<usize> = stopped.iter().map(Vec::len).collect();
        assert!(lengths.contains(&16) && lengths.iter().any(|&n| n < 16), "{arch}: lengths {lengths:?}");
    }
}

#[test]
fn batched_logits_equal_one_at_a_time() {
    let device = NdArrayDevice::Cpu;
    for arch in common::ARCHS {
        let model = load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
        let prompts = prompts(model.config.vocab_size);
        let cfg = greedy(3);
        let mut batched = Generator::new(&model, &prompts, &cfg);
        let all = batched.forward().into_data().to_vec::<f32>().unwrap();
        let v = all.len() / prompts.len();
        for (i, p) in prompts.iter().enumerate() {
            let mut alone = Generator::new(&model, &[p.clone()], &cfg);
            let one = alone.forward().into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&all[i * v..(i + 1) * v], &one);
            assert!(err < 1e-5, "{arch}: prompt {i}: rel error {err:.2e}");
        }
    }
}

#[test]
fn batched_sampling_equals_one_at_a_time() {
    let device = NdArrayDevice::Cpu;
    let model = load_model::<NdArray>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let cfg = GenerateConfig { max_new_tokens: 12, temperature: 0.9, top_k: Some(40), top_p: Some(0.95), repetition_penalty: 1.2, seed: 11, stop_ids: Vec::new() };
    let out = check("llama sampled", &model, &cfg, 6);
    assert!(out.iter().any(|o| o != &out[0]), "sampling gives different replies to different prompts");
}

#[test]
fn batched_generation_with_lora_and_nf4() {
    let device = NdArrayDevice::Cpu;
    let (model, _) = common::llama_with_given_adapter::<NdArray>(&device);
    let with_lora = check("llama + LoRA", &model, &greedy(16), 6);
    let plain = load_model::<NdArray>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    assert_ne!(with_lora, check("llama", &plain, &greedy(16), 6), "the adapter changes the replies");
    let nf4 = load_model_with::<NdArray>(&Dir(common::fixtures().join("llama")), LoadOptions { nf4: Some(Nf4Options::default()) }, &device).unwrap();
    check("llama NF4", &nf4, &greedy(16), 3);
}

#[test]
fn batched_greedy_tokens_equal_one_at_a_time_on_wgpu() {
    let device = WgpuDevice::DefaultDevice;
    for arch in ["llama", "phi3"] {
        let model = load_model::<Wgpu>(&Dir(common::fixtures().join(arch)), &device).unwrap();
        check(&format!("{arch} on wgpu"), &model, &greedy(12), 6);
    }
}
