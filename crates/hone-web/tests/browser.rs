//! In headless Chromium over WebGPU (SwiftShader in CI): the fixtures are loaded from bytes, as
//! the page loads them, and the logits must equal transformers' within 1e-4 relative, with the
//! matmul kernel the device set-up chose (hone's, on SwiftShader: checked below).

#![cfg(target_arch = "wasm32")]

use hone::io::safetensors::SafeTensors;
use hone::io::{MemFiles, MemSource};
use hone::parity::{read_ids, rel_error};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

macro_rules! fixture {
    ($($path:expr),+) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/", $($path),+)).as_slice()
    };
}

fn files(arch: &str, list: &[(&str, &'static [u8])]) -> MemFiles {
    let mut set = MemFiles::new(arch);
    for (name, bytes) in list {
        set.insert(*name, bytes.to_vec());
    }
    set
}

async fn check(arch: &str, model_files: MemFiles, expected: &'static [u8]) {
    let device = hone_web::device().await;
    let model = hone::model::load_model::<hone_web::Backend>(&model_files, &device).unwrap();
    let expected = SafeTensors::open(Box::new(MemSource::new("expected.safetensors", expected.to_vec()))).unwrap();
    for k in 0..2 {
        let ids = read_ids(&expected, &format!("ids_{k}")).unwrap();
        let (_, reference) = expected.read_f32(&format!("logits_{k}")).unwrap();
        // Twice: a kernel whose first call returned unwritten memory would differ here.
        for attempt in 0..2 {
            let ours = hone_web::logits(&model, &ids).await.unwrap();
            let err = rel_error(&ours, &reference);
            web_sys_log(&format!("{arch} input {k} call {attempt}: rel error {err:.2e}"));
            assert!(err < 1e-4, "{arch} input {k} call {attempt}: rel error {err:.3e}");
        }
    }
}

fn web_sys_log(s: &str) {
    wasm_bindgen_test::console_log!("{}", s);
}

macro_rules! single_file_arch {
    ($name:ident, $arch:literal) => {
        #[wasm_bindgen_test]
        async fn $name() {
            let set = files(
                $arch,
                &[
                    ("config.json", fixture!($arch, "/config.json")),
                    ("model.safetensors", fixture!($arch, "/model.safetensors")),
                ],
            );
            check($arch, set, fixture!($arch, "/expected.safetensors")).await;
        }
    };
}

single_file_arch!(llama_logits_match_transformers, "llama");
single_file_arch!(llama3_logits_match_transformers, "llama3");
single_file_arch!(smollm2_logits_match_transformers, "smollm2");
single_file_arch!(mistral_logits_match_transformers, "mistral");
single_file_arch!(phi3_logits_match_transformers, "phi3");

#[wasm_bindgen_test]
async fn qwen2_sharded_logits_match_transformers() {
    let set = files(
        "qwen2",
        &[
            ("config.json", fixture!("qwen2/config.json")),
            ("model.safetensors.index.json", fixture!("qwen2/model.safetensors.index.json")),
            ("model-00001-of-00002.safetensors", fixture!("qwen2/model-00001-of-00002.safetensors")),
            ("model-00002-of-00002.safetensors", fixture!("qwen2/model-00002-of-00002.safetensors")),
        ],
    );
    check("qwen2", set, fixture!("qwen2/expected.safetensors")).await;
}

#[wasm_bindgen_test]
async fn swiftshader_is_seen_as_a_software_adapter() {
    // Burn's tiled matmul is several times slower on SwiftShader than hone's barrier-free one;
    // the set-up must recognise the adapter (wgpu reports no adapter kind on the web).
    hone_web::device().await;
    assert!(hone::ops::register_matmul_for(u64::MAX), "the device set-up did not choose hone's matmul (for every size) on SwiftShader");
}

#[wasm_bindgen_test]
fn tokenizer_ids_match_python_tokenizers() {
    let tok = hone::data::Tokenizer::from_bytes(fixture!("tokenizer.json"), "tokenizer.json").unwrap();
    let checked = hone::parity::check_token_ids(&tok, fixture!("tokenizer_cases.json")).unwrap();
    assert!(checked >= 5);
}

#[wasm_bindgen_test]
async fn nf4_quantize_and_webgpu_dequantize_match_bitsandbytes() {
    use hone::ops::HoneBackend;
    use hone::quant::{Nf4Tensor, Nf4Weight};
    let device = hone_web::device().await;
    let st = SafeTensors::open(Box::new(MemSource::new("nf4.safetensors", fixture!("nf4/nf4.safetensors").to_vec()))).unwrap();
    for case in ["square", "ragged", "wide", "small_block", "many_blocks", "zeros"] {
        let (shape, w) = st.read_f32(&format!("{case}.weight")).unwrap();
        let (_, bs) = st.read_raw(&format!("{case}.blocksize")).unwrap();
        let bs = i64::from_le_bytes(bs[..8].try_into().unwrap()) as usize;
        for (dq, key) in [(false, format!("{case}.dequantized")), (true, format!("{case}.dq.dequantized"))] {
            // Quantized in wasm, bit-exact with bitsandbytes' packed bytes ...
            let q = Nf4Tensor::quantize(&w, &shape, bs, dq).unwrap();
            assert_eq!(q.packed, st.read_raw(&format!("{case}.packed")).unwrap().1, "{case}: packed");
            // ... and dequantized on WebGPU (the shaders/ kernel, and the tensor-op version),
            // bit-exact with bitsandbytes' values.
            let w = Nf4Weight::<hone_web::Backend>::from_host(&q, &device);
            let (_, theirs) = st.read_f32(&key).unwrap();
            for (path, t) in [("kernel", <hone_web::Backend as HoneBackend>::nf4_dequantize(&w)), ("tensor ops", w.dequantize())] {
                let ours = t.into_data_async().await.unwrap().to_vec::<f32>().unwrap();
                let differ = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(ours.len(), theirs.len());
                assert_eq!(differ, 0, "{case} (double quant {dq}, {path}): {differ} values differ");
            }
        }
    }
}
