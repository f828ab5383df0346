//! Logits equal transformers' for every architecture (fixtures from tests/reference), on the
//! CPU backend. The wgpu twin is in forward_wgpu.rs; the browser's in crates/hone-web/tests.

mod common;

#[test]
fn logits_match_transformers_on_ndarray() {
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    common::check_all_archs::<burn::backend::NdArray>(&device);
}
