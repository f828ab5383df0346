//! A safetensors file: the header and tensor table, then every tensor read as f32.
#![no_main]
use hone::io::safetensors::SafeTensors;
use hone::io::MemSource;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(st) = SafeTensors::open(Box::new(MemSource::new("f.safetensors", data.to_vec()))) {
        for name in st.tensors().keys() {
            let _ = st.read_f32(name);
        }
    }
});
