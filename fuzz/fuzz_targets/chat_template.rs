//! An untrusted chat template (as a model file carries it) and untrusted messages: the first
//! line is the template, each further line a message's content, roles taking turns.
#![no_main]
use hone::data::{ChatTemplate, Message};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let Some(source) = lines.next() else { return };
    let roles = ["system", "user", "assistant", "user", "assistant"];
    let messages: Vec<Message> = lines.zip(roles.iter().cycle()).map(|(c, r)| Message { role: r.to_string(), content: c.to_string() }).collect();
    if let Ok(t) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()), "tokenizer_config.json") {
        let _ = t.render(&messages, true);
        let _ = t.render(&messages, false);
    }
});
