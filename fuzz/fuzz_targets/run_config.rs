//! A TOML run config (`hone train --config`), as its settings are read and checked.
#![no_main]
use hone::train::run::RunSettings;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = toml::from_str::<RunSettings>(text) {
        let _ = s.format();
        let _ = s.nf4();
        let _ = s.train(0);
        let _ = s.lora();
    }
});
