//! Dataset lines: SFT JSONL in every format, and preference pairs.
#![no_main]
use hone::data::dataset::parse_jsonl;
use hone::data::preference::parse_preference_jsonl;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_jsonl(&text, "data.jsonl", None, true);
    let _ = parse_jsonl(&text, "data.jsonl", None, false);
    let _ = parse_preference_jsonl(&text, "prefs.jsonl", true);
});
