//! A PEFT adapter: adapter_config.json and adapter_model.safetensors, split at the first NUL
//! byte of the input (config before, weights after).
#![no_main]
use hone::io::MemFiles;
use hone::lora::peft::{Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, weights) = (&data[..cut], data.get(cut + 1..).unwrap_or_default());
    let files = MemFiles::new("adapter").with(ADAPTER_CONFIG_FILE, config.to_vec()).with(ADAPTER_WEIGHTS_FILE, weights.to_vec());
    let _ = Adapter::read(&files);
});
