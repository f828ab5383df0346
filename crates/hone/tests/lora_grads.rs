//! One forward and backward with a PEFT-written adapter gives PEFT's loss and LoRA gradients,
//! on a plain f32 base and on an NF4 base (bitsandbytes, double quant, f32 compute), on the CPU
//! and on wgpu with hone's matmul kernel (what software adapters run: lavapipe here, SwiftShader
//! in the browser). Fixtures: tests/reference/make_lora_fixtures.py.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use hone::ops::HoneBackend;
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource};
use hone::lora::peft::Adapter;
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::parity::{read_ids, rel_error};
use hone::train::loss::causal_lm_loss;

fn check(arch: &str, qlora: bool) {
    check_on::<Autodiff<NdArray>>(arch, qlora, &Default::default());
}

fn check_on<B: AutodiffBackend + HoneBackend>(arch: &str, qlora: bool, device: &B::Device) {
    let device = device.clone();
    let fixtures = common::fixtures();
    let expected = SafeTensors::open(Box::new(FileSource::open(&fixtures.join(format!("lora/{arch}_grads.safetensors"))).unwrap())).unwrap();
    let options = LoadOptions { nf4: qlora.then(Nf4Options::default) };
    let mut model = load_model_with::<B>(&Dir(fixtures.join(arch)), options, &device).unwrap();
    let adapter = Adapter::read(&Dir(fixtures.join(format!("lora/{arch}_peft_adapter")))).unwrap();
    adapter.attach(model.linears_mut()).unwrap();

    let ids = read_ids(&expected, "ids").unwrap();
    let t = ids.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, t]), &device);
    let loss = causal_lm_loss(model.forward(&ids.to_data()), ids);
    let prefix = if qlora { "qlora." } else { "" };
    let ours_loss = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let ref_loss = expected.read_f32(&format!("{prefix}loss")).unwrap().1[0];
    println!("{arch} qlora={qlora}: loss {ours_loss} (PEFT {ref_loss})");
    assert!(((ours_loss - ref_loss) / ref_loss).abs() < 1e-5, "{arch} qlora={qlora}: loss {ours_loss} vs {ref_loss}");

    let grads = loss.backward();
    let mut checked = 0;
    let mut worst = 0f64;
    for (name, lin) in model.linears() {
        let Some(lora) = &lin.lora else { continue };
        for (which, param) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            let key = format!("{prefix}base_model.model.{name}.{which}.weight.grad");
            let (_, reference) = expected.read_f32(&key).unwrap();
            let ours = param.val().grad(&grads).expect("a gradient").into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&ours, &reference);
            worst = worst.max(err);
            assert!(err < 1e-4, "{key}: rel error {err:.3e}");
            checked += 1;
        }
    }
    println!("{arch} qlora={qlora}: {checked} gradients, worst rel error {worst:.2e}");
    assert_eq!(checked, adapter.layers.len() * 2);
}

#[test]
fn lora_gradients_match_peft() {
    check("llama", false);
    check("phi3", false);
}

#[test]
fn qlora_gradients_match_peft_on_nf4_base() {
    check("llama", true);
    check("phi3", true);
}

#[test]
fn qlora_gradients_match_peft_on_wgpu_with_hones_matmul() {
    // The only test in this binary on a GPU backend, so the process-wide switch touches no other.
    hone::ops::use_register_matmul(true);
    let device = burn::backend::wgpu::WgpuDevice::default();
    for arch in ["llama", "phi3"] {
        for qlora in [false, true] {
            check_on::<Autodiff<burn::backend::Wgpu>>(arch, qlora, &device);
        }
    }
}
