//! A GGUF file: metadata, the tensor table, every dequantizer, the config, tokenizer and chat
//! template hone builds from its metadata.
#![no_main]
use hone::data::Message;
use hone::io::gguf::Gguf;
use hone::io::MemSource;
use hone_fuzz::tolerate_caught_panics;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tolerate_caught_panics();
    if let Ok(g) = Gguf::open(Box::new(MemSource::new("f.gguf", data.to_vec()))) {
        for name in g.tensors.keys() {
            let _ = g.read_f32(name);
        }
        let _ = hone::model::gguf::config_from_gguf(&g);
        if let Ok(tok) = hone::data::gguf_tokenizer::tokenizer_from_gguf(&g) {
            let _ = tok.encode("Hello, world.", true);
        }
        if let Ok(Some(t)) = hone::data::gguf_tokenizer::chat_template_from_gguf(&g) {
            let _ = t.render(&[Message { role: "user".into(), content: "Hi".into() }], true);
        }
    }
});

