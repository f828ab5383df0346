//! DoRA (PEFT's `use_dora`) against PEFT (tests/reference/make_dora_fixtures.py): loss and the
//! lora_A / lora_B / magnitude gradients on f32 and NF4 bases, three AdamW steps, PEFT's files
//! both ways with PEFT's logits, and merge_and_unload.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::lora::linear::MAGNITUDE;
use hone::lora::merge::merge_to_dir;
use hone::lora::peft::{add_adapters, to_host, Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use hone::lora::{LoraConfig, Targets};
use hone::model::{load_model, load_model_with, LoadOptions, Nf4Options};
use hone::ops::HoneBackend;
use hone::parity::{read_ids, rel_error};
use hone::train::loss::causal_lm_loss;
use hone::train::Trainer;
use std::path::PathBuf;

fn dora_dir() -> PathBuf {
    common::fixtures().join("dora")
}

fn open(path: PathBuf) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(&path).unwrap())).unwrap()
}

fn peft_adapter(arch: &str) -> Adapter {
    Adapter::read(&Dir(dora_dir().join(format!("{arch}_peft_adapter")))).unwrap()
}

fn check_grads<B: AutodiffBackend + HoneBackend>(arch: &str, qlora: bool, device: &B::Device) {
    let expected = open(dora_dir().join(format!("{arch}_grads.safetensors")));
    let options = LoadOptions { nf4: qlora.then(Nf4Options::default) };
    let mut model = load_model_with::<B>(&Dir(common::fixtures().join(arch)), options, device).unwrap();
    let adapter = peft_adapter(arch);
    assert!(adapter.use_dora && adapter.layers.iter().all(|l| l.magnitude.is_some()));
    adapter.attach(model.linears_mut()).unwrap();

    let ids = read_ids(&expected, "ids").unwrap();
    let t = ids.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, t]), device);
    let loss = causal_lm_loss(model.forward(&ids.to_data()), ids);
    let prefix = if qlora { "qlora." } else { "" };
    let ours = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let theirs = expected.read_f32(&format!("{prefix}loss")).unwrap().1[0];
    println!("{arch} qlora={qlora}: loss {ours} (PEFT {theirs})");
    assert!(((ours - theirs) / theirs).abs() < 1e-5, "{arch} qlora={qlora}: loss {ours} vs {theirs}");

    let grads = loss.backward();
    let (mut checked, mut worst) = (0, 0f64);
    for (name, lin) in model.linears() {
        let Some(lora) = &lin.lora else { continue };
        for (which, param) in lora.params() {
            let key = match which {
                MAGNITUDE => format!("{prefix}base_model.model.{name}.{which}.grad"),
                _ => format!("{prefix}base_model.model.{name}.{which}.weight.grad"),
            };
            let (_, reference) = expected.read_f32(&key).unwrap();
            let ours = param.val().grad(&grads).expect("a gradient").into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&ours, &reference);
            worst = worst.max(err);
            assert!(err < 1e-4, "{key}: rel error {err:.3e}");
            checked += 1;
        }
    }
    println!("{arch} qlora={qlora}: {checked} gradients (A, B, magnitude), worst rel error {worst:.2e}");
    assert_eq!(checked, adapter.layers.len() * 3);
}

#[test]
fn dora_loss_and_gradients_match_peft() {
    for arch in ["llama", "phi3"] {
        check_grads::<Autodiff<NdArray>>(arch, false, &Default::default());
    }
}

#[test]
fn dora_loss_and_gradients_match_peft_on_nf4_base() {
    for arch in ["llama", "phi3"] {
        check_grads::<Autodiff<NdArray>>(arch, true, &Default::default());
    }
}

#[test]
fn dora_gradients_match_peft_on_wgpu() {
    // What GPU adapters run (lavapipe here, SwiftShader in the browser): the fused NF4 kernels.
    let device = burn::backend::wgpu::WgpuDevice::default();
    for (arch, qlora) in [("llama", true), ("phi3", false)] {
        check_grads::<Autodiff<burn::backend::Wgpu>>(arch, qlora, &device);
    }
}

fn check_training(qlora: bool, checkpointing: bool) {
    type B = Autodiff<NdArray>;
    let expected = open(dora_dir().join("llama_adamw.safetensors"));
    let device = Default::default();
    let mut model = load_model_with::<B>(&Dir(common::fixtures().join("llama")), LoadOptions { nf4: qlora.then(Nf4Options::default) }, &device).unwrap();
    let adapter = peft_adapter("llama");
    adapter.attach(model.linears_mut()).unwrap();
    let lora = LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, use_dora: true, ..Default::default() };
    let mut trainer = Trainer::new(model, lora, common::llama_training_samples(), common::three_adamw_steps(checkpointing), device);
    let prefix = if qlora { "qlora." } else { "" };
    let (_, want) = expected.read_f32(&format!("{prefix}losses")).unwrap();
    let mut losses = Vec::new();
    while !trainer.done() {
        losses.push(trainer.step().loss);
    }
    println!("qlora={qlora} checkpointing={checkpointing}: losses {losses:?} (PEFT {want:?})");
    assert_eq!(losses.len(), 3);
    for (ours, theirs) in losses.iter().zip(&want) {
        assert!(((ours - *theirs as f64) / *theirs as f64).abs() < 1e-4, "loss {ours} vs {theirs}");
    }
    let trained = trainer.adapter("x");
    assert!(trained.use_dora);
    let mut worst = 0f64;
    for layer in &trained.layers {
        let magnitude = layer.magnitude.as_ref().expect("a DoRA layer");
        for (key, ours) in [("lora_A.weight", &layer.a), ("lora_B.weight", &layer.b), (MAGNITUDE, magnitude)] {
            let (_, theirs) = expected.read_f32(&format!("{prefix}base_model.model.{}.{key}", layer.module)).unwrap();
            let err = rel_error(ours, &theirs);
            worst = worst.max(err);
            assert!(err < 1e-4, "{}.{key}: {err:.3e}", layer.module);
        }
    }
    println!("qlora={qlora} checkpointing={checkpointing}: worst rel error of final A/B/magnitude {worst:.2e}");
    assert_eq!(trained.layers.len(), 14);
}

#[test]
fn dora_three_adamw_steps_match_peft() {
    check_training(false, false);
    check_training(false, true);
}

#[test]
fn dora_three_adamw_steps_match_peft_on_nf4_base() {
    check_training(true, false);
}

fn logits_with(arch: &str, adapter: &Adapter, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let mut model = load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    model.logits(ids).into_data().to_vec::<f32>().unwrap()
}

#[test]
fn peft_dora_adapter_in_hone_gives_pefts_logits() {
    for arch in ["llama", "phi3"] {
        let e = open(dora_dir().join(format!("{arch}_adapter_logits.safetensors")));
        let ids = read_ids(&e, "ids").unwrap();
        let err = rel_error(&logits_with(arch, &peft_adapter(arch), &ids), &e.read_f32("peft_adapter.logits").unwrap().1);
        println!("{arch}: PEFT's DoRA adapter in hone vs PEFT: {err:.2e}");
        assert!(err < 1e-5, "{arch}: {err:.3e}");
    }
}

/// A DoRA adapter as hone makes one (PEFT's init: magnitude = row norms of W), then moved off
/// its start so that it changes the logits: B drawn, the magnitude scaled per row.
fn hone_adapter(arch: &str) -> Adapter {
    let device = Default::default();
    let mut model = load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
    let config = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::parse("q_proj,v_proj,down_proj,qkv_proj"), use_dora: true, init: Default::default(), seed: 11, ..Default::default() };
    add_adapters(model.linears_mut(), &config);
    let mut adapter = to_host(model.linears(), &config, &format!("tests/fixtures/{arch}"));
    for (i, layer) in adapter.layers.iter_mut().enumerate() {
        layer.b = layer.b.iter().enumerate().map(|(k, _)| 0.02 * (((k * 7 + i * 3) % 11) as f32 - 5.0)).collect();
        for (k, m) in layer.magnitude.as_mut().unwrap().iter_mut().enumerate() {
            *m *= 1.0 + 0.01 * ((k % 5) as f32 - 2.0);
        }
    }
    adapter
}

#[test]
#[ignore = "writes the committed fixture; run with --ignored, then tests/reference/make_dora_fixtures.py"]
fn write_hone_dora_adapter_fixtures() {
    for arch in ["llama", "phi3"] {
        let adapter = hone_adapter(arch);
        let dir = dora_dir().join(format!("{arch}_hone_adapter"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), adapter.config_json()).unwrap();
        std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), adapter.weights_bytes()).unwrap();
    }
}

#[test]
fn hone_dora_adapter_in_peft_gives_hones_logits() {
    for arch in ["llama", "phi3"] {
        let adapter = hone_adapter(arch);
        let dir = dora_dir().join(format!("{arch}_hone_adapter"));
        assert_eq!(adapter.weights_bytes(), std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap(), "{arch}: hone writes other bytes than the committed adapter");
        assert_eq!(adapter.config_json(), std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap(), "{arch}");
        assert_eq!(Adapter::read(&Dir(dir)).unwrap().weights_bytes(), adapter.weights_bytes(), "{arch}: read back and written again");
        let e = open(dora_dir().join(format!("{arch}_adapter_logits.safetensors")));
        let ids = read_ids(&e, "ids").unwrap();
        let err = rel_error(&logits_with(arch, &adapter, &ids), &e.read_f32("hone_adapter.logits").unwrap().1);
        println!("{arch}: hone's DoRA adapter, hone vs PEFT: {err:.2e}");
        assert!(err < 1e-5, "{arch}: {err:.3e}");
    }
}

#[test]
fn fresh_dora_starts_at_the_base_and_its_magnitude_at_the_row_norms() {
    let device = Default::default();
    let base = load_model::<NdArray>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let ids = [3u32, 50, 7, 200, 11];
    let before = base.logits(&ids).into_data().to_vec::<f32>().unwrap();
    let mut model = load_model::<NdArray>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let config = LoraConfig { r: 4, alpha: 8.0, use_dora: true, ..Default::default() };
    assert_eq!(add_adapters(model.linears_mut(), &config), 14);
    let after = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
    assert!(rel_error(&after, &before) < 1e-6);
    let weights = open(common::fixtures().join("llama/model.safetensors"));
    for (name, lin) in model.linears() {
        let Some(l) = &lin.lora else { continue };
        let m = l.dora.as_ref().unwrap().magnitude.val().into_data().to_vec::<f32>().unwrap();
        let (shape, w) = weights.read_f32(&format!("{name}.weight")).unwrap();
        let norms: Vec<f32> = w.chunks(shape[1]).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        assert!(rel_error(&m, &norms) < 1e-6, "{name}");
    }
}

#[test]
fn dora_merge_equals_pefts_merge_and_unload() {
    for arch in ["llama", "phi3"] {
        let fixtures = common::fixtures();
        let adapter = peft_adapter(arch);
        let out = std::env::temp_dir().join(format!("hone-dora-merge-{arch}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let report = merge_to_dir(&Dir(fixtures.join(arch)), &adapter, &out).unwrap();
        assert_eq!(report.merged_layers, adapter.layers.len());
        let merged = open(out.join("model.safetensors"));
        let peft = open(dora_dir().join(format!("{arch}_merged.safetensors")));
        let mut worst = 0f64;
        for name in peft.tensors().keys() {
            let err = rel_error(&merged.read_f32(name).unwrap().1, &peft.read_f32(name).unwrap().1);
            worst = worst.max(err);
            assert!(err < 1e-6, "{arch}: {name}: {err:.3e}");
        }
        // The merged model gives the logits of base + DoRA adapter.
        let ids = [3u32, 50, 7, 200, 11, 90, 4];
        let device = Default::default();
        let a = load_model::<NdArray>(&Dir(out.clone()), &device).unwrap().logits(&ids).into_data().to_vec::<f32>().unwrap();
        let err = rel_error(&a, &logits_with(arch, &adapter, &ids));
        println!("{arch}: merged weights vs PEFT worst {worst:.2e}; merged logits vs adapter {err:.2e}");
        assert!(err < 1e-5);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn llama_cpp_export_refuses_dora_and_says_merge() {
    let config = hone::model::Config::from_json(&std::fs::read(common::fixtures().join("llama/config.json")).unwrap(), "config.json").unwrap();
    let err = hone::export::gguf_lora::lora_to_gguf(&peft_adapter("llama"), &config, "x").unwrap_err().to_string();
    assert!(err.contains("DoRA") && err.contains("merge"), "{err}");
}

#[test]
fn a_dora_config_without_magnitudes_is_refused_by_tensor() {
    let dir = dora_dir().join("llama_peft_adapter");
    let mut files = hone::io::MemFiles::new("adapter");
    files.insert(ADAPTER_CONFIG_FILE, std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap());
    let plain = Adapter::read(&Dir(common::fixtures().join("lora/llama_peft_adapter"))).unwrap();
    files.insert(ADAPTER_WEIGHTS_FILE, plain.weights_bytes());
    let err = Adapter::read(&files).unwrap_err().to_string();
    assert!(err.contains(MAGNITUDE) && err.contains("missing"), "{err}");
    // And magnitudes without `use_dora` are not silently dropped.
    let mut files = hone::io::MemFiles::new("adapter");
    files.insert(ADAPTER_CONFIG_FILE, std::fs::read(common::fixtures().join("lora/llama_peft_adapter").join(ADAPTER_CONFIG_FILE)).unwrap());
    files.insert(ADAPTER_WEIGHTS_FILE, std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap());
    let err = Adapter::read(&files).unwrap_err().to_string();
    assert!(err.contains("use_dora"), "{err}");
}

#[test]
fn generation_reuses_dora_norms_and_gives_the_tokens_of_full_forwards() {
    // Greedy tokens from the generator (norms computed once, KV cache) are the argmax of full
    // forwards without either, token by token.
    let device = Default::default();
    let mut model = load_model::<NdArray>(&Dir(common::fixtures().join("phi3")), &device).unwrap();
    peft_adapter("phi3").attach(model.linears_mut()).unwrap();
    let cfg = hone::generate::GenerateConfig { max_new_tokens: 8, temperature: 0.0, stop_ids: vec![], ..Default::default() };
    let prompt = [3u32, 50, 7, 200];
    let tokens = hone::generate::generate(&model, &prompt, &cfg);
    assert_eq!(tokens.len(), 8);
    let mut context = prompt.to_vec();
    for &t in &tokens {
        let logits = model.logits(&context).into_data().to_vec::<f32>().unwrap();
        let last = &logits[logits.len() - logits.len() / context.len()..];
        let argmax = last.iter().enumerate().fold(0, |best, (i, v)| if *v > last[best] { i } else { best });
        assert_eq!(t as usize, argmax, "after {context:?}");
        context.push(t);
    }
}
