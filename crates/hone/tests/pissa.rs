//! PiSSA (PEFT's `init_lora_weights="pissa"`) against PEFT (tests/reference/make_pissa_fixtures.py):
//! the initial A and B (signs of singular vectors normalised) and the residual base, and the
//! conversion of a moved adapter to a rank-2r LoRA of the original base, which PEFT loads.

mod common;

use burn::backend::NdArray;
use hone::io::safetensors::SafeTensors;
use hone::io::weights::Weights;
use hone::io::{Dir, FileSource};
use hone::lora::peft::{Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use hone::lora::LoraConfig;
use hone::model::load::{build, read_config};
use hone::model::init_source::InitSource;
use hone::model::{CausalLm, LoadOptions};
use hone::parity::{read_ids, rel_error};
use std::path::PathBuf;

fn dir() -> PathBuf {
    common::fixtures().join("pissa")
}

fn open(path: PathBuf) -> SafeTensors {
    SafeTensors::open(Box::new(FileSource::open(&path).unwrap())).unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, init: hone::lora::init::Init::Pissa, ..Default::default() }
}

/// The fixture model loaded as PiSSA's residual, and PiSSA's initial adapter.
fn pissa_model(arch: &str) -> (CausalLm<NdArray>, Adapter) {
    let files = Dir(common::fixtures().join(arch));
    let weights = Weights::open(&files).unwrap();
    let source = InitSource::new(&weights, &lora(), None).unwrap();
    let model = build::<NdArray>(read_config(&files).unwrap(), &source, LoadOptions::default(), &Default::default()).unwrap();
    (model, source.initial(&format!("tests/fixtures/{arch}")))
}

#[test]
fn pissa_init_and_residual_equal_pefts() {
    for arch in ["llama", "phi3"] {
        let (model, initial) = pissa_model(arch);
        let e = open(dir().join(format!("{arch}_init.safetensors")));
        assert_eq!(initial.layers.len(), model.linears().len() - 1, "{arch}: every decoder linear");
        let (mut worst_ab, mut worst_res) = (0f64, 0f64);
        for l in &initial.layers {
            let (_, a) = e.read_f32(&format!("base_model.model.{}.lora_A.weight", l.module)).unwrap();
            let (_, b) = e.read_f32(&format!("base_model.model.{}.lora_B.weight", l.module)).unwrap();
            let err = common::svd_pair_error(l, &a, &b);
            assert!(err < 1e-4, "{arch} {}: A/B {err:.3e}", l.module);
            worst_ab = worst_ab.max(err);
            let (_, want) = e.read_f32(&format!("residual.{}.weight", l.module)).unwrap();
            let lin = model.linears().into_iter().find(|(n, _)| n == &l.module).unwrap().1;
            let ours = lin.weight.to_dense().into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&ours, &want);
            assert!(err < 1e-5, "{arch} {}: residual {err:.3e}", l.module);
            worst_res = worst_res.max(err);
        }
        println!("{arch}: {} layers, A/B worst {worst_ab:.2e}, residual worst {worst_res:.2e}", initial.layers.len());
    }
}

/// PEFT's moved adapter (trained on the residual) converted with hone's own initial A/B.
fn hone_converted(arch: &str) -> Adapter {
    let (_, initial) = pissa_model(arch);
    let moved = Adapter::read_unconverted(&Dir(dir().join(format!("{arch}_moved_adapter")))).unwrap();
    assert!(moved.pissa);
    moved.with_initial_subtracted(&initial).unwrap()
}

fn logits_on_original_base(arch: &str, adapter: &Adapter, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let mut model = hone::model::load_model::<NdArray>(&Dir(common::fixtures().join(arch)), &device).unwrap();
    adapter.attach(model.linears_mut()).unwrap();
    model.logits(ids).into_data().to_vec::<f32>().unwrap()
}

#[test]
fn an_unconverted_pissa_adapter_is_refused_for_the_base() {
    let err = Adapter::read(&Dir(dir().join("llama_moved_adapter"))).unwrap_err().to_string();
    assert!(err.contains("unconverted PiSSA") && err.contains("convert"), "{err}");
}

#[test]
fn conversion_to_a_rank_2r_lora_equals_pefts() {
    for arch in ["llama", "phi3"] {
        let ours = hone_converted(arch);
        let peft = Adapter::read(&Dir(dir().join(format!("{arch}_converted_adapter")))).unwrap();
        assert_eq!((ours.r, ours.alpha, ours.use_rslora), (peft.r, peft.alpha, peft.use_rslora), "{arch}: rank 2r, alpha doubled");
        let mut worst = 0f64;
        for (l, p) in ours.layers.iter().zip(&peft.layers) {
            assert_eq!((&l.module, l.a_shape, l.b_shape), (&p.module, p.a_shape, p.b_shape));
            // The update s·B·A: the same whatever the signs of the singular vectors.
            let err = rel_error(&l.delta(ours.scaling()), &p.delta(peft.scaling()));
            assert!(err < 1e-4, "{arch} {}: {err:.3e}", l.module);
            worst = worst.max(err);
        }
        let e = open(dir().join(format!("{arch}_init.safetensors")));
        let ids = read_ids(&e, "ids").unwrap();
        let err = rel_error(&logits_on_original_base(arch, &ours, &ids), &e.read_f32("moved.logits").unwrap().1);
        println!("{arch}: converted update vs PEFT's worst {worst:.2e}; on the original base vs PEFT's residual + moved adapter {err:.2e}");
        assert!(err < 1e-4, "{arch}: {err:.3e}");
    }
}

#[test]
#[ignore = "writes the committed fixture; run with --ignored, then tests/reference/make_pissa_fixtures.py"]
fn write_hone_pissa_fixtures() {
    for arch in ["llama", "phi3"] {
        let adapter = hone_converted(arch);
        let out = dir().join(format!("{arch}_hone_converted_adapter"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(ADAPTER_CONFIG_FILE), adapter.config_json()).unwrap();
        std::fs::write(out.join(ADAPTER_WEIGHTS_FILE), adapter.weights_bytes()).unwrap();
    }
}

#[test]
fn hones_converted_adapter_in_peft_gives_hones_logits() {
    for arch in ["llama", "phi3"] {
        let committed = Adapter::read(&Dir(dir().join(format!("{arch}_hone_converted_adapter")))).unwrap();
        let e = open(dir().join(format!("{arch}_init.safetensors")));
        let ids = read_ids(&e, "ids").unwrap();
        let ours = logits_on_original_base(arch, &committed, &ids);
        let err = rel_error(&ours, &e.read_f32("hone_converted.logits").unwrap().1);
        println!("{arch}: hone's converted PiSSA adapter, hone vs PEFT: {err:.2e}");
        assert!(err < 1e-5, "{arch}: {err:.3e}");
    }
}

#[test]
fn a_trained_pissa_adapter_converted_gives_the_trained_models_logits_on_the_original_base() {
    type B = burn::backend::Autodiff<NdArray>;
    let files = Dir(common::fixtures().join("llama"));
    let weights = Weights::open(&files).unwrap();
    let source = InitSource::new(&weights, &lora(), None).unwrap();
    let device = Default::default();
    let mut model = build::<B>(read_config(&files).unwrap(), &source, LoadOptions::default(), &device).unwrap();
    let initial = source.initial("llama");
    hone::lora::peft::add_adapters(model.linears_mut(), &lora());
    initial.attach(model.linears_mut()).unwrap();
    let ids = [3u32, 50, 7, 200, 11, 90, 4];
    // PiSSA starts where the base is.
    let base = hone::model::load_model::<NdArray>(&files, &device).unwrap().logits(&ids).into_data().to_vec::<f32>().unwrap();
    let start = burn::module::AutodiffModule::valid(&model).logits(&ids).into_data().to_vec::<f32>().unwrap();
    assert!(rel_error(&start, &base) < 1e-5);
    let mut trainer = hone::train::Trainer::new(model, lora(), common::llama_training_samples(), common::three_adamw_steps(false), device);
    while !trainer.done() {
        trainer.step();
    }
    let trained = trainer.eval_model().logits(&ids).into_data().to_vec::<f32>().unwrap();
    let converted = trainer.adapter("llama").with_initial_subtracted(&initial).unwrap();
    assert_eq!((converted.r, converted.alpha), (8, 16.0));
    let err = rel_error(&logits_on_original_base("llama", &converted, &ids), &trained);
    println!("trained on the residual vs converted on the original base: {err:.2e} (training moved the logits by {:.2e})", rel_error(&trained, &base));
    assert!(err < 1e-5 && rel_error(&trained, &base) > 1e-2, "{err:.3e}");
}
