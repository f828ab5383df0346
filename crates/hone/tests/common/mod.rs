#![allow(dead_code)]

use hone::quant::HoneBackend;
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
            let ours = model.logits(&ids, device).into_data().to_vec::<f32>().unwrap();
            let err = rel_error(&ours, &reference);
            println!("{arch} input {k} ({} tokens): rel error {err:.2e}", ids.len());
            assert!(err < TOLERANCE, "{arch} input {k}: rel error {err:.3e} >= {TOLERANCE:e}");
        }
    }
}
