//! A model split across two devices (layers placed like a device map) computes what it does on
//! one: logits, QLoRA training steps (with and without checkpointing) and cached generation.
//! Both devices are wgpu devices of this machine (lavapipe in CI): each has its own queue and
//! memory, so every boundary crossing is a real copy between devices.

mod common;

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use hone::data::Sample;
use hone::generate::{generate, GenerateConfig};
use hone::io::weights::Weights;
use hone::lora::peft::add_adapters;
use hone::lora::{LoraConfig, Targets};
use hone::model::load::{build_placed, read_config};
use hone::model::{CausalLm, LoadOptions, Nf4Options, Placement};
use hone::parity::rel_error;
use hone::train::plan::{split_layers, PlanOptions};
use hone::train::{TrainConfig, Trainer};

type B = Autodiff<Wgpu>;

const LAYERS: usize = 4;
const VOCAB: usize = 96;

fn devices() -> [WgpuDevice; 2] {
    [WgpuDevice::DefaultDevice, WgpuDevice::Cpu]
}

fn load(files: &hone::io::MemFiles, placement: &Placement<WgpuDevice>) -> CausalLm<B> {
    let config = read_config(files).unwrap();
    let weights = Weights::open(files).unwrap();
    let (mut model, _) = build_placed::<B>(config, &weights, LoadOptions { nf4: Some(Nf4Options::default()) }, placement).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 5 };
    add_adapters(model.linears_mut(), &lora);
    // A non-zero B (seeded on the host), so that every LoRA tensor gets a gradient at once.
    for (k, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        let Some(l) = lin.lora.as_mut() else { continue };
        let [o, r] = l.lora_b.dims();
        let values: Vec<f32> = (0..o * r).map(|i| (((i * 37 + k * 11) % 23) as f32 - 11.0) * 0.01).collect();
        let device = l.lora_b.device();
        l.lora_b = Param::from_tensor(Tensor::from_data(TensorData::new(values, [o, r]), &device));
    }
    model
}

fn samples() -> Vec<Sample> {
    (0..4)
        .map(|r| {
            let ids: Vec<u32> = (0..24 - r * 3).map(|i| ((i * 13 + r * 5) % VOCAB) as u32).collect();
            Sample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids }
        })
        .collect()
}

fn adapter(model: &CausalLm<B>) -> Vec<(String, Vec<f32>)> {
    let read = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
    model.linears().into_iter().filter_map(|(n, l)| l.lora.as_ref().map(|l| (n, [read(l.lora_a.val()), read(l.lora_b.val())].concat()))).collect()
}

fn train(model: CausalLm<B>, checkpointing: bool) -> (Vec<f64>, Vec<(String, Vec<f32>)>) {
    let device = model.model.embed_tokens.device();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 5 };
    let cfg = TrainConfig { batch_size: 2, lr: 1e-2, checkpointing, max_grad_norm: Some(1.0), ..Default::default() };
    let mut trainer = Trainer::new(model, lora, samples(), cfg, device);
    let losses = (0..3).map(|_| trainer.step().loss).collect();
    (losses, adapter(&trainer.model))
}

#[test]
fn a_model_split_across_two_devices_matches_one_device() {
    let [a, b] = devices();
    for tied in [true, false] {
        let files = common::Synthetic { hidden: 64, inter: 160, layers: LAYERS, vocab: VOCAB, heads: 4, max_positions: 64 };
        let files = if tied { files.files() } else { untied(&files) };
        let one = Placement::single(a.clone(), LAYERS);
        let two = Placement::from_indices(&[a.clone(), b.clone()], &[0, 0, 1, 1]).unwrap();
        let whole = load(&files, &one);
        let split = load(&files, &two);

        // The weights and adapters really are on the second device.
        assert_eq!(split.model.layers[3].device(), b);
        assert_eq!(split.model.layers[1].device(), a);
        assert_eq!(split.model.layers[2].self_attn.o_proj.lora.as_ref().unwrap().lora_a.device(), b);
        assert_eq!(split.head_device(), if tied { a.clone() } else { b.clone() });
        assert_eq!(split.devices().len(), 2);

        let ids: Vec<u32> = (0..20).map(|i| (i * 7 % VOCAB) as u32).collect();
        let l1 = whole.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let l2 = split.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let err = rel_error(&l2, &l1);
        println!("tied {tied}: logits rel error {err:.2e}");
        assert!(err < 1e-6, "logits differ across placements: {err:.2e}");

        let cfg = GenerateConfig { max_new_tokens: 8, temperature: 0.0, ..Default::default() };
        assert_eq!(generate(&split, &ids[..5], &cfg), generate(&whole, &ids[..5], &cfg), "cached greedy generation");

        for checkpointing in [true, false] {
            let (loss1, ad1) = train(load(&files, &one), checkpointing);
            let (loss2, ad2) = train(load(&files, &two), checkpointing);
            println!("tied {tied}, checkpointing {checkpointing}: losses {loss1:?} vs {loss2:?}");
            for (x, y) in loss1.iter().zip(&loss2) {
                assert!((x - y).abs() <= 1e-5 * x.abs(), "loss {x} vs {y}");
            }
            assert_eq!(ad1.len(), LAYERS * 7);
            for ((n, x), (_, y)) in ad1.iter().zip(&ad2) {
                let err = rel_error(y, x);
                assert!(err < 1e-5, "{n}: rel error {err:.2e} after 3 steps");
            }
        }
    }
}

/// Data parallelism across nodes combines with a device map: two nodes (threads here, talking
/// over loopback TCP as processes would), each with its layers split over both devices and a
/// micro-batch of 1, train as one peer with batch 2 on the same placement.
#[test]
fn nodes_with_layers_split_over_two_devices_train_as_one_with_their_joint_batch() {
    use hone::train::data_parallel::{DataParallel, Nodes};
    let [a, b] = devices();
    let files = common::Synthetic { hidden: 64, inter: 160, layers: LAYERS, vocab: VOCAB, heads: 4, max_positions: 64 };
    let files = files.files();
    let two = Placement::from_indices(&[a.clone(), b.clone()], &[0, 0, 1, 1]).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 5 };
    let cfg = |batch_size| TrainConfig { batch_size, lr: 1e-2, max_grad_norm: Some(1.0), ..Default::default() };
    let mut alone = Trainer::new(load(&files, &two), lora.clone(), samples(), cfg(2), a.clone());
    let alone_losses: Vec<f64> = (0..3).map(|_| alone.step().loss).collect();
    let alone = adapter(&alone.model);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes: Vec<_> = (0..2)
        .map(|rank| {
            let (files, two, lora, a) = (files.clone(), two.clone(), lora.clone(), a.clone());
            std::thread::spawn(move || {
                let nodes = Nodes { count: 2, rank, orchestrator: format!("127.0.0.1:{port}") };
                let t = Trainer::new(load(&files, &two), lora, samples(), cfg(1), a);
                let mut t = t.data_parallel(DataParallel::across(nodes, 0, 1)).unwrap();
                let losses: Vec<f64> = (0..3).map(|_| t.step().loss).collect();
                (losses, adapter(&t.model))
            })
        })
        .collect();
    for (rank, node) in nodes.into_iter().enumerate() {
        let (losses, ad) = node.join().unwrap();
        println!("node {rank}: losses {losses:?} vs {alone_losses:?}");
        for (x, y) in alone_losses.iter().zip(&losses) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "loss {x} vs {y}");
        }
        assert_eq!(ad.len(), LAYERS * 7);
        for ((n, x), (_, y)) in alone.iter().zip(&ad) {
            let err = rel_error(y, x);
            assert!(err < 1e-5, "node {rank}: {n}: rel error {err:.2e} after 3 steps");
        }
    }
}

/// The synthetic model with its own lm_head.
fn untied(s: &common::Synthetic) -> hone::io::MemFiles {
    let tied = s.files();
    let weights = Weights::open(&tied).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for name in weights.names() {
        let (_, info) = weights.info(name).unwrap();
        tensors.push((name.clone(), info.shape.clone(), weights.read(name, &info.shape).unwrap()));
    }
    let head: Vec<f32> = (0..VOCAB * s.hidden).map(|i| ((i * 29 % 41) as f32 - 20.0) * 0.002).collect();
    tensors.push(("lm_head.weight".into(), vec![VOCAB, s.hidden], head));
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, sh, v)| (n.as_str(), sh.as_slice(), v.as_slice())).collect();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
        "rms_norm_eps": 1e-5, "max_position_embeddings": s.max_positions, "tie_word_embeddings": false
    });
    hone::io::MemFiles::new("synthetic-untied")
        .with("config.json", serde_json::to_vec(&config).unwrap())
        .with("model.safetensors", hone::io::safetensors::write_f32(&refs, &Default::default()))
}

/// The device map the plan makes for Llama-3-70B: one 80 GB device holds a QLoRA run, two
/// 40 GB ones share it, one 40 GB one does not and says by how much.
#[test]
fn plan_splits_70b_layers_by_memory() {
    let config = hone::model::Config::from_json(&std::fs::read(common::fixtures().join("configs/Meta-Llama-3-70B.json")).unwrap(), "Meta-Llama-3-70B.json").unwrap();
    let lora = LoraConfig { r: 16, alpha: 32.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 0 };
    let o = PlanOptions::new(1, 512, true);
    let gb = 1_000_000_000u64;
    let one = split_layers(&config, &lora, &o, &[80 * gb]).unwrap();
    assert!(one.layer_device.iter().all(|&d| d == 0));
    let two = split_layers(&config, &lora, &o, &[40 * gb, 40 * gb]).unwrap();
    let on_first = two.layer_device.iter().filter(|&&d| d == 0).count();
    println!("70B over 2 × 40 GB: {on_first} layers on device 0, {} on device 1; bytes {:?}", 80 - on_first, two.device_bytes);
    assert!(two.layer_device.windows(2).all(|w| w[0] <= w[1]), "layers in order");
    assert!((30..80).contains(&on_first));
    assert!(two.device_bytes.iter().all(|&b| b <= 40 * gb));
    let total = hone::train::plan::plan(&config, &lora, &o).total_bytes;
    assert!(two.device_bytes.iter().sum::<u64>() >= total, "each device counts its own workspace");
    let err = split_layers(&config, &lora, &o, &[40 * gb]).unwrap_err();
    println!("{err}");
    assert!(err.contains("short"), "{err}");
    let balanced = hone::train::plan::balance_layers(&config, &lora, &o, 4);
    let (lo, hi) = (*balanced.device_bytes.iter().min().unwrap(), *balanced.device_bytes.iter().max().unwrap());
    println!("70B balanced over 4: {:?}", balanced.device_bytes);
    assert_eq!(balanced.device_bytes.len(), 4);
    assert!(hi - lo < 3 * gb, "balanced within a few layers: {lo} .. {hi}");
}
