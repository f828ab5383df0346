//! tokenizer.json, then an encode and a decode.
#![no_main]
use hone::data::Tokenizer;
use hone_fuzz::tolerate_caught_panics;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tolerate_caught_panics();
    if let Ok(tok) = Tokenizer::from_bytes(data, "tokenizer.json") {
        if let Ok(ids) = tok.encode("Hello, world. <|end|>", true) {
            let _ = tok.decode(&ids, false);
        }
    }
});

