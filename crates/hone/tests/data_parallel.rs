//! Data-parallel training on burn's collective engine: N peers (threads, each with its own copy
//! of the model) with micro-batch b train the adapter one peer trains with micro-batch N·b —
//! same data, seed and steps, shuffled, clipped, with gradient accumulation — and every peer
//! ends with the same adapter.

mod common;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use hone::data::Sample;
use hone::io::Dir;
use hone::lora::peft::{add_adapters, Adapter};
use hone::lora::{LoraConfig, Targets};
use hone::parity::rel_error;
use hone::train::data_parallel::DataParallel;
use hone::train::{TrainConfig, Trainer};

type B = Autodiff<NdArray>;

fn samples(vocab: usize) -> Vec<Sample> {
    (0..16)
        .map(|r| {
            let ids: Vec<u32> = (0..6 + (r * 5) % 11).map(|i| ((i * 13 + r * 7 + 1) % vocab) as u32).collect();
            // Loss on the second half only, so that rows count different numbers of tokens.
            let labels = ids.iter().enumerate().map(|(i, &t)| if i >= ids.len() / 2 { t as i64 } else { -100 }).collect();
            Sample { input_ids: ids, labels }
        })
        .collect()
}

fn config(batch_size: usize, grad_accum: usize) -> TrainConfig {
    TrainConfig { lr: 1e-2, batch_size, grad_accum, max_steps: Some(3), seed: 5, shuffle: true, max_grad_norm: Some(0.5), ..common::three_adamw_steps(false) }
}

/// One peer's run (`dp` None: a run alone); returns the adapter and the losses.
fn run(dp: Option<DataParallel>, batch_size: usize, grad_accum: usize) -> (Adapter, Vec<f64>) {
    let device = NdArrayDevice::Cpu;
    let mut model = hone::model::load_model::<B>(&Dir(common::fixtures().join("llama")), &device).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false, init: Default::default(), seed: 3 };
    add_adapters(model.linears_mut(), &lora);
    let data = samples(model.config.vocab_size);
    let mut trainer = Trainer::new(model, lora, data, config(batch_size, grad_accum), device);
    if let Some(dp) = dp {
        trainer = trainer.data_parallel(dp).unwrap();
    }
    let losses = (0..3).map(|_| trainer.step().loss).collect();
    trainer.leave_peers().unwrap();
    (trainer.adapter("llama"), losses)
}

fn worst(a: &Adapter, b: &Adapter) -> f64 {
    a.layers.iter().zip(&b.layers).map(|(x, y)| rel_error(&x.a, &y.a).max(rel_error(&x.b, &y.b))).fold(0.0, f64::max)
}

#[test]
fn peers_with_micro_batch_b_train_as_one_with_n_times_b() {
    for (peers, b, accum) in [(2, 2, 1), (4, 1, 1), (2, 1, 2)] {
        let (alone, alone_losses) = run(None, peers * b, accum);
        let handles: Vec<_> = (0..peers).map(|rank| std::thread::spawn(move || run(Some(DataParallel::new(rank, peers)), b, accum))).collect();
        let results: Vec<(Adapter, Vec<f64>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        burn_collective::reset_collective::<NdArray>();
        for (rank, (adapter, losses)) in results.iter().enumerate() {
            let err = worst(adapter, &alone);
            println!("{peers} peers × batch {b} × accum {accum}, peer {rank}: worst rel error {err:.2e} against 1 × {}; losses {losses:?} vs {alone_losses:?}", peers * b);
            assert!(err < 1e-5, "{peers} peers, peer {rank}: {err:.3e}");
            for (l, m) in losses.iter().zip(&alone_losses) {
                assert!((l - m).abs() <= 1e-5 * m.abs(), "{peers} peers, peer {rank}: loss {l} vs {m}");
            }
            assert_eq!(worst(adapter, &results[0].0), 0.0, "peer {rank} ends where peer 0 does");
        }
        // The adapter moved: the comparison is not between two untrained adapters.
        assert!(alone.layers.iter().any(|l| l.b.iter().any(|&v| v != 0.0)));
    }
}
