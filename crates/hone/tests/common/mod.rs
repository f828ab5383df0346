#![allow(dead_code)]

use hone::ops::HoneBackend;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::parity::{read_ids, rel_error};
use std::path::PathBuf;

pub const ARCHS: [&str; 6] = ["llama", "llama3", "smollm2", "mistral", "qwen2", "phi3"];
pub const TOLERANCE: f64 = 1e-4;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn check_all_archs<B: HoneBackend>(device: &B::Device) {
    for arch in ARCHS {
        let dir = fixtures().join(arch);
        let model = hone::model::load_model::<B>(&Dir(dir.clone()), device).unwrap();
        let expected = SafeTensors::open(Box::new(FileSource::open(&dir.join("expected.safetensors")).unwrap())).unwrap();
        for k in 0..2 {
            let ids = read_ids(&expected, &format!("ids_{k}")).unwrap();
            let (_, reference) = expected.read_f32(&format!("logits_{k}")).unwrap();
            let ours = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&ours, &reference);
            println!("{arch} input {k} ({} tokens): rel error {err:.2e}", ids.len());
            assert!(err < TOLERANCE, "{arch} input {k}: rel error {err:.3e} >= {TOLERANCE:e}");
        }
    }
}

/// Shape of a synthetic Llama made in memory with seeded weights.
pub struct Synthetic {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub vocab: usize,
    pub heads: usize,
    pub max_positions: usize,
}

impl Synthetic {
    pub fn files(&self) -> hone::io::MemFiles {
        self.files_with(serde_json::json!({}))
    }

    /// With `extra` config.json fields set over the defaults.
    pub fn files_with(&self, extra: serde_json::Value) -> hone::io::MemFiles {
        let mut config = serde_json::json!({
            "model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
            "rms_norm_eps": 1e-5, "max_position_embeddings": self.max_positions, "tie_word_embeddings": true
        });
        for (k, v) in extra.as_object().expect("an object") {
            config[k] = v.clone();
        }
        let (h, m) = (self.hidden, self.inter);
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut seed = 1u32;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 * 0.1 - 0.05
                })
                .collect()
        };
        tensors.push(("model.embed_tokens.weight".into(), vec![self.vocab, h], rand(self.vocab * h)));
        tensors.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                tensors.push((format!("{p}.self_attn.{n}.weight"), vec![h, h], rand(h * h)));
            }
            tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h], rand(m * h)));
            tensors.push((format!("{p}.mlp.up_proj.weight"), vec![m, h], rand(m * h)));
            tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, m], rand(m * h)));
            tensors.push((format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![h], vec![1.0; h]));
        }
        let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
        hone::io::MemFiles::new("synthetic")
            .with("config.json", serde_json::to_vec(&config).unwrap())
            .with("model.safetensors", hone::io::safetensors::write_f32(&refs, &Default::default()))
    }
}

/// PEFT starts B at zero, which leaves A's gradient zero: gradient checks start from a
/// trained-looking B drawn uniformly from ±`scale`.
pub fn randomize_lora_b<B: burn::tensor::backend::AutodiffBackend + HoneBackend>(model: &mut hone::model::CausalLm<B>, scale: f64, device: &B::Device) {
    for (_, lin) in model.linears_mut() {
        let l = lin.lora.as_mut().expect("adapters attached");
        let dims = l.lora_b.dims();
        l.lora_b = burn::module::Param::from_tensor(burn::tensor::Tensor::random(dims, burn::tensor::Distribution::Uniform(-scale, scale), device));
    }
}

/// The llama fixture's two sequences as samples with loss on every token (the batch the
/// training fixtures of tests/reference/make_train_fixtures.py use).
pub fn llama_training_samples() -> Vec<hone::data::Sample> {
    let e = SafeTensors::open(Box::new(FileSource::open(&fixtures().join("llama/expected.safetensors")).unwrap())).unwrap();
    ["ids_0", "ids_1"]
        .iter()
        .map(|k| {
            let ids = read_ids(&e, k).unwrap();
            hone::data::Sample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids }
        })
        .collect()
}

/// The settings of tests/reference/make_train_fixtures.py's three AdamW steps (linear schedule,
/// clipping, weight decay, the padded batch of two in order). Checkpointed runs also take the
/// loss a few positions at a time (chunked cross-entropy).
pub fn three_adamw_steps(checkpointing: bool) -> hone::train::TrainConfig {
    hone::train::TrainConfig {
        lr: 1e-2,
        schedule: hone::train::Schedule::Linear,
        warmup_steps: 0,
        adamw: hone::train::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        max_grad_norm: Some(1.0),
        batch_size: 2,
        grad_accum: 1,
        max_steps: Some(3),
        epochs: 1,
        seed: 0,
        shuffle: false,
        pad_id: 0,
        checkpointing,
        pack_len: None,
        max_batch_tokens: None,
        logits_chunk: if checkpointing { 3000 } else { hone::train::trainer::LOGITS_CHUNK },
        ..Default::default()
    }
}

/// The tiny Llama with the given PEFT adapter (tests/fixtures/lora/llama_peft_adapter) attached,
/// and a LoRA config like it without dropout: where the preference fixtures' runs start.
pub fn llama_with_given_adapter<B: HoneBackend>(device: &B::Device) -> (hone::model::CausalLm<B>, hone::lora::LoraConfig) {
    let mut model = hone::model::load_model::<B>(&Dir(fixtures().join("llama")), device).unwrap();
    let adapter = hone::lora::peft::Adapter::read(&Dir(fixtures().join("lora/llama_peft_adapter"))).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    (model, hone::lora::LoraConfig { r: adapter.r, alpha: adapter.alpha, dropout: 0.0, ..Default::default() })
}

/// The training settings of a preference fixture's run (its "train" object): full batch,
/// constant lr, clipping, in order.
pub fn fixture_run(train: &serde_json::Value, dpo: hone::train::preference::DpoConfig, checkpointing: bool) -> hone::train::TrainConfig {
    hone::train::TrainConfig {
        lr: train["learning_rate"].as_f64().unwrap(),
        schedule: hone::train::Schedule::Constant,
        max_grad_norm: train["max_grad_norm"].as_f64(),
        batch_size: train["batch_size"].as_u64().unwrap() as usize,
        max_steps: train["max_steps"].as_u64().map(|s| s as usize),
        shuffle: false,
        pad_id: 0,
        checkpointing,
        logits_chunk: if checkpointing { 3000 } else { hone::train::trainer::LOGITS_CHUNK },
        dpo: Some(dpo),
        ..Default::default()
    }
}

/// Asserts every A and B of `trained` is within 1e-4 (relative) of a PEFT safetensors file's
/// (a path under the fixtures); returns the worst error.
pub fn assert_adapter_equals(trained: &hone::lora::peft::Adapter, file: &str, label: &str) -> f64 {
    let expected = SafeTensors::open(Box::new(FileSource::open(&fixtures().join(file)).unwrap())).unwrap();
    let mut worst = 0f64;
    for layer in &trained.layers {
        for (which, ours) in [("lora_A", &layer.a), ("lora_B", &layer.b)] {
            let (_, theirs) = expected.read_f32(&format!("base_model.model.{}.{which}.weight", layer.module)).unwrap();
            let err = rel_error(ours, &theirs);
            worst = worst.max(err);
            assert!(err < TOLERANCE, "{label}: {}.{which}: {err:.3e}", layer.module);
        }
    }
    assert_eq!(trained.layers.len(), expected.tensors().len() / 2, "{label}: one A and one B per adapted layer");
    worst
}

/// A layer's A and B against a reference's (PiSSA's, LoftQ's), each singular pair's sign taken
/// from the reference's A (a pair is defined up to a common sign): the worse relative error.
pub fn svd_pair_error(layer: &hone::lora::peft::HostLora, ref_a: &[f32], ref_b: &[f32]) -> f64 {
    let ([r, inp], out) = (layer.a_shape, layer.b_shape[0]);
    let (mut a, mut b) = (layer.a.clone(), layer.b.clone());
    for c in 0..r {
        let dot: f32 = (0..inp).map(|j| a[c * inp + j] * ref_a[c * inp + j]).sum();
        if dot < 0.0 {
            (0..inp).for_each(|j| a[c * inp + j] *= -1.0);
            (0..out).for_each(|i| b[i * r + c] *= -1.0);
        }
    }
    hone::parity::rel_error(&a, ref_a).max(hone::parity::rel_error(&b, ref_b))
}
