//! In a dedicated Web Worker, as the page runs hone: the model is read from `Blob`s range by
//! range (never whole) and its logits on WebGPU equal transformers'.

#![cfg(target_arch = "wasm32")]

use hone::io::safetensors::SafeTensors;
use hone::io::{FileSet, MemSource};
use hone::parity::{read_ids, rel_error};
use hone_web::blob::BlobFiles;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

macro_rules! fixture {
    ($($path:expr),+) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/", $($path),+)).as_slice()
    };
}

fn blob(bytes: &[u8]) -> web_sys::Blob {
    let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(bytes));
    web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap()
}

#[wasm_bindgen_test]
async fn phi3_from_blobs_matches_transformers() {
    let mut files = BlobFiles::new("phi3");
    files.insert("config.json", blob(fixture!("phi3/config.json")));
    files.insert("model.safetensors", blob(fixture!("phi3/model.safetensors")));
    // A ranged read returns exactly the bytes at that range.
    let src = files.open_required("model.safetensors").unwrap();
    let whole = fixture!("phi3/model.safetensors");
    assert_eq!(src.len() as usize, whole.len());
    assert_eq!(src.read_vec(1000, 64).unwrap(), &whole[1000..1064]);
    assert!(src.read_vec(whole.len() as u64 - 10, 64).is_err());

    let device = hone_web::device().await;
    let model = hone::model::load_model::<hone_web::Backend>(&files, &device).unwrap();
    let expected = SafeTensors::open(Box::new(MemSource::new("expected.safetensors", fixture!("phi3/expected.safetensors").to_vec()))).unwrap();
    for k in 0..2 {
        let ids = read_ids(&expected, &format!("ids_{k}")).unwrap();
        let (_, reference) = expected.read_f32(&format!("logits_{k}")).unwrap();
        let ours = hone_web::logits(&model, &ids).await.unwrap();
        let err = rel_error(&ours, &reference);
        assert!(err < 1e-4, "phi3 input {k}: rel error {err:.3e}");
    }
}
