//! Logits equal transformers' on burn's wgpu backend natively (Vulkan; lavapipe in CI).

mod common;

#[test]
fn logits_match_transformers_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::default();
    common::check_all_archs::<burn::backend::Wgpu>(&device);
}
