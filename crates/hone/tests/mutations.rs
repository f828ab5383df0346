//! Every parser of files people get from anywhere, fed seeded mutations of the committed
//! fixtures (bytes flipped, set to extreme values, cut, repeated, removed; in the headers most of
//! all): each mutant gives a value or an error, never a panic, a hang or a huge allocation. The
//! stable, always-on companion of fuzzing: each input that once crashed a parser is kept below
//! as a named regression case.

mod common;

use burn::backend::NdArray;
use hone::data::dataset::parse_jsonl;
use hone::data::preference::parse_preference_jsonl;
use hone::data::{ChatTemplate, Message, Tokenizer};
use hone::io::gguf::Gguf;
use hone::io::safetensors::SafeTensors;
use hone::io::{MemFiles, MemSource};
use hone::lora::peft::{Adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Mutants per parser; enough to cover each header field many times in a few seconds.
const MUTANTS: usize = 2000;

/// Seeded draws: ChaCha8 (hone's own generator for LoRA initialisation).
struct Rng(rand_chacha::ChaCha8Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        Rng(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        use rand_chacha::rand_core::RngCore;
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations, at positions below `hot` three times in four (the header, where a
/// parser decides what to allocate and read).
fn mutate(rng: &mut Rng, input: &[u8], hot: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(rng.next() as u8);
            continue;
        }
        let at = if rng.below(4) < 3 { rng.below(hot.min(v.len())) } else { rng.below(v.len()) };
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
            // A little-endian u64 or u32 set to an extreme (a length, count or offset).
            2 => {
                let x: u64 = [u64::MAX, 1 << 40, 1 << 32, 0x8000_0000, 0][rng.below(5)];
                let n = if rng.below(2) == 0 { 8 } else { 4 };
                for (i, b) in x.to_le_bytes().iter().take(n).enumerate() {
                    if at + i < v.len() {
                        v[at + i] = *b;
                    }
                }
            }
            3 => v.truncate(at),
            4 => {
                let len = 1 + rng.below(16).min(v.len() - at);
                let piece = v[at..at + len.min(v.len() - at)].to_vec();
                v.splice(at..at, piece);
            }
            5 => {
                v.remove(at);
            }
            _ => {
                let alphabet = b"{}[]\":,\\0123456789eE-.ntfu";
                v.insert(at, alphabet[rng.below(alphabet.len())]);
            }
        }
    }
    v
}

/// Runs `parse` on `MUTANTS` mutants of `input`; fails with the seed and the panic of any
/// mutant that panics, or one that takes over 10 s.
fn survive(name: &str, input: &[u8], hot: usize, seed: u64, parse: impl Fn(&[u8])) {
    let mut rng = Rng::new(seed);
    let mut errors = Vec::new();
    for i in 0..MUTANTS {
        let m = mutate(&mut rng, input, hot);
        let t0 = Instant::now();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| parse(&m))) {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            let path = std::env::temp_dir().join(format!("hone-mutant-{name}-{i}"));
            std::fs::write(&path, &m).unwrap();
            errors.push(format!("mutant {i} (kept in {}): {msg}", path.display()));
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{name}: mutant {i} took {:?}", t0.elapsed());
    }
    assert!(errors.is_empty(), "{name}: {} of {MUTANTS} mutants panicked:\n{}", errors.len(), errors.join("\n"));
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join(path)).unwrap()
}

fn header_len(safetensors: &[u8]) -> usize {
    8 + u64::from_le_bytes(safetensors[..8].try_into().unwrap()) as usize
}

#[test]
fn safetensors_mutants_never_panic() {
    let bytes = fixture("llama/model.safetensors");
    survive("safetensors", &bytes, header_len(&bytes), 1, |m| {
        if let Ok(st) = SafeTensors::open(Box::new(MemSource::new("m.safetensors", m.to_vec()))) {
            for name in st.tensors().keys() {
                let _ = st.read_f32(name);
            }
        }
    });
}

#[test]
fn gguf_mutants_never_panic() {
    for (i, file) in ["gguf/types.gguf", "gguf/spm_llama.gguf"].iter().enumerate() {
        let bytes = fixture(file);
        // The header and tensor table: everything before the first tensor's data.
        let hot = Gguf::open(Box::new(MemSource::new("g.gguf", bytes.clone()))).unwrap().tensors.values().map(|t| t.offset as usize).min().unwrap_or(bytes.len());
        survive(file, &bytes, hot, 2 + i as u64, |m| {
            if let Ok(g) = Gguf::open(Box::new(MemSource::new("m.gguf", m.to_vec()))) {
                for name in g.tensors.keys() {
                    let _ = g.read_f32(name);
                }
                let _ = hone::model::gguf::config_from_gguf(&g);
                if let Ok(tok) = hone::data::gguf_tokenizer::tokenizer_from_gguf(&g) {
                    let _ = tok.encode("Hello world", true);
                }
                if let Ok(Some(t)) = hone::data::gguf_tokenizer::chat_template_from_gguf(&g) {
                    let _ = t.render(&[Message { role: "user".into(), content: "Hi".into() }], true);
                }
            }
        });
    }
}

#[test]
fn gguf_model_loading_mutants_never_panic() {
    let bytes = fixture("gguf/spm_llama.gguf");
    let hot = Gguf::open(Box::new(MemSource::new("g.gguf", bytes.clone()))).unwrap().tensors.values().map(|t| t.offset as usize).min().unwrap_or(bytes.len());
    survive("gguf-model", &bytes, hot, 3, |m| {
        if let Ok(g) = Gguf::open(Box::new(MemSource::new("m.gguf", m.to_vec()))) {
            let _ = hone::model::gguf::load_gguf::<NdArray>(&g, Default::default(), &Default::default());
        }
    });
}

#[test]
fn tokenizer_json_and_config_mutants_never_panic() {
    let tok = fixture("chat/tokenizer.json");
    survive("tokenizer.json", &tok, tok.len(), 4, |m| {
        if let Ok(t) = Tokenizer::open(&MemFiles::new("m").with("tokenizer.json", m.to_vec())) {
            let _ = t.encode("Hello world", true);
        }
    });
    let config = fixture("llama/config.json");
    survive("config.json", &config, config.len(), 5, |m| {
        let _ = hone::model::load::read_config(&MemFiles::new("m").with("config.json", m.to_vec()));
    });
}

#[test]
fn chat_template_mutants_never_panic() {
    let cfg = fixture("chat/tokenizer_config.json");
    let messages = [Message { role: "system".into(), content: "Be brief.".into() }, Message { role: "user".into(), content: "Hi".into() }, Message { role: "assistant".into(), content: "Hello.".into() }];
    survive("tokenizer_config.json", &cfg, cfg.len(), 6, |m| {
        if let Ok(Some(t)) = ChatTemplate::open(&MemFiles::new("m").with("tokenizer_config.json", m.to_vec())) {
            let _ = t.render(&messages, true);
        }
    });
    let source = serde_json::from_slice::<serde_json::Value>(&cfg).unwrap()["chat_template"].as_str().unwrap().to_string();
    survive("chat template", source.as_bytes(), source.len(), 7, |m| {
        if let Ok(t) = ChatTemplate::new(&String::from_utf8_lossy(m), Some("<s>".into()), Some("</s>".into()), "m") {
            let _ = t.render(&messages, false);
        }
    });
}

#[test]
fn dataset_line_mutants_never_panic() {
    let sft = "{\"text\": \"a b\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"instruction\": \"i\", \"input\": \"x\", \"output\": \"o\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n";
    survive("sft jsonl", sft.as_bytes(), sft.len(), 8, |m| {
        let _ = parse_jsonl(&String::from_utf8_lossy(m), "m.jsonl", None, true);
    });
    let prefs = "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"chosen\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"A\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"B\"}]}\n";
    survive("preference jsonl", prefs.as_bytes(), prefs.len(), 9, |m| {
        let _ = parse_preference_jsonl(&String::from_utf8_lossy(m), "m.jsonl", true);
    });
}

#[test]
fn adapter_mutants_never_panic() {
    let dir = common::fixtures().join("lora/llama_peft_adapter");
    let (config, weights) = (std::fs::read(dir.join(ADAPTER_CONFIG_FILE)).unwrap(), std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap());
    survive("adapter_config.json", &config, config.len(), 10, |m| {
        let _ = Adapter::read(&MemFiles::new("m").with(ADAPTER_CONFIG_FILE, m.to_vec()).with(ADAPTER_WEIGHTS_FILE, weights.clone()));
    });
    survive("adapter_model.safetensors", &weights, header_len(&weights), 11, |m| {
        let _ = Adapter::read(&MemFiles::new("m").with(ADAPTER_CONFIG_FILE, config.clone()).with(ADAPTER_WEIGHTS_FILE, m.to_vec()));
    });
}

#[test]
fn table_and_tokenizer_model_mutants_never_panic() {
    use hone::data::table::{csv_to_jsonl, parquet_bytes_to_jsonl, Columns};
    let csv = fixture("tables/chat.csv");
    survive("csv", &csv, csv.len(), 12, |m| {
        let _ = csv_to_jsonl(m, "m.csv", &Columns::default());
    });
    let parquet = fixture("tables/chat.parquet");
    survive("parquet", &parquet, parquet.len(), 13, |m| {
        let _ = parquet_bytes_to_jsonl(m.to_vec(), "m.parquet", &Columns::default());
    });
    let model = fixture("spm/tokenizer.model");
    let config = br#"{"vocab_size": 384}"#.to_vec();
    survive("tokenizer.model", &model, 256, 14, |m| {
        let files = MemFiles::new("m").with("config.json", config.clone()).with("tokenizer.model", m.to_vec());
        let _ = hone::export::gguf_vocab::vocab_metadata(&files, hone::model::config::Arch::Llama, 384);
    });
}

// Regression cases: inputs that once crashed a parser, kept by name.

/// A Parquet file on which parquet 60.2's reader panics (bit_util.rs, found by the `table` fuzz
/// target): an error naming the file.
#[test]
fn regression_parquet_file_that_panics_the_parquet_reader() {
    let err = hone::data::table::parquet_bytes_to_jsonl(fixture("tables/damaged.parquet"), "damaged.parquet", &Default::default()).unwrap_err().to_string();
    assert!(err.contains("damaged.parquet") && err.contains("damaged Parquet file"), "{err}");
}

/// The error opening the chat fixture's tokenizer.json with `from` replaced by `to` once,
/// after the first `after`.
fn tokenizer_edit_err(after: &str, from: &str, to: &str) -> String {
    let text = String::from_utf8(fixture("chat/tokenizer.json")).unwrap();
    let at = text.find(after).unwrap();
    let bad = format!("{}{}", &text[..at], text[at..].replacen(from, to, 1));
    match Tokenizer::open(&MemFiles::new("m").with("tokenizer.json", bad.into_bytes())) {
        Ok(_) => panic!("a broken tokenizer.json was accepted"),
        Err(e) => e.to_string(),
    }
}

/// tokenizers 0.22 panicked (`expect("Helper")`) on a syntax error inside the decoder section
/// (found by `tokenizer_json_and_config_mutants_never_panic`).
#[test]
fn regression_tokenizer_json_with_a_syntax_error_in_its_decoder() {
    let err = tokenizer_edit_err("\"decoder\"", "\"ByteLevel\"", "ByteLevel");
    assert!(err.contains("m/tokenizer.json") && err.contains("invalid JSON"), "{err}");
}

/// A post-processor whose special token the file does not define: tokenizers 0.22 panicked at
/// the first encode ("no entry found for key"; found by the same test). Now refused before any
/// encode, by a check that needs no unwinding (wasm has none).
#[test]
fn regression_tokenizer_json_whose_post_processor_names_an_unknown_token() {
    let err = tokenizer_edit_err("\"special_tokens\"", "\"<|endoftext|>\": {", "\"<|endoftet|>\": {");
    assert!(err.contains("m/tokenizer.json") && err.contains("post_processor") && err.contains("\"<|endoftext|>\", which special_tokens does not define"), "{err}");
}

/// A special token whose ids and tokens differ in length (tokenizers' reader accepts it).
#[test]
fn tokenizer_json_whose_special_token_has_more_ids_than_tokens_is_refused() {
    let err = tokenizer_edit_err("\"special_tokens\"", "\"ids\": [", "\"ids\": [1, ");
    assert!(err.contains("m/tokenizer.json") && err.contains("has 2 ids but 1 tokens"), "{err}");
}

/// A GGUF whose `llama.attention.head_count` is 0: `config_from_gguf` divided by it (found by
/// `cargo xtask fuzz --target gguf`; the crash input kept as a fixture).
#[test]
fn regression_gguf_with_zero_attention_heads() {
    let g = Gguf::open(Box::new(MemSource::new("crash.gguf", fixture("gguf/crash_zero_heads.gguf")))).unwrap();
    let err = hone::model::gguf::config_from_gguf(&g).unwrap_err().to_string();
    assert!(err.contains("crash.gguf") && err.contains("llama.attention.head_count"), "{err}");
}

/// A chat_template fuzz input read as the fuzz target reads it: the template's line, then one
/// message per line, roles taking turns.
fn fuzzed_template(name: &str) -> (ChatTemplate, Vec<Message>) {
    let text = String::from_utf8_lossy(&fixture(name)).into_owned();
    let mut lines = text.split('\n');
    let source = lines.next().unwrap();
    let roles = ["system", "user", "assistant", "user", "assistant"];
    let messages = lines.zip(roles.iter().cycle()).map(|(c, r)| Message { role: r.to_string(), content: c.to_string() }).collect();
    (ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()), "tokenizer_config.json").unwrap(), messages)
}

/// A template looping over a 2.3 MB string wrote 251 MB within its fuel (found by `cargo xtask
/// fuzz --target chat_template` as a 20 s timeout; the input kept as a fixture, read as the fuzz
/// target reads it: the template's line, then one message per line).
#[test]
fn regression_chat_template_writing_hundreds_of_megabytes() {
    let (t, messages) = fuzzed_template("chat/fuzz_long_output.txt");
    let err = t.render(&messages, true).unwrap_err().to_string();
    // Its fuel (in proportion to the 2.3 MB given) runs out first now; the 64 MiB cap is
    // `data.rs::a_chat_template_that_writes_without_end_stops_at_the_limit`.
    assert!(err.contains("tokenizer_config.json") && err.contains("ran out of fuel"), "{err}");
}

/// minijinja folds constant expressions while compiling, outside fuel, and a repeated list
/// literal there is not bounded: `466666 ~ 6666666*['ontent']` took 2 s and 170 MB in
/// `ChatTemplate::new` (23 s in the fuzz build, found by `cargo xtask fuzz --target
/// chat_template`). Refused before compiling, by line, without that work.
#[test]
fn regression_chat_template_folding_millions_of_list_items() {
    let text = String::from_utf8_lossy(&fixture("chat/fuzz_stringified_millions.txt")).into_owned();
    let source = text.split('\n').next().unwrap();
    let err = ChatTemplate::new(source, None, None, "tokenizer_config.json").err().expect("refused").to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("constant expression on its line 1") && err.contains("MB"), "{err}");
    // Constants of a real template's size still fold and render.
    let t = ChatTemplate::new("{{ '=' * 20 ~ ['a', 'b'] * 3 ~ (2 ** 10) }}", None, None, "tokenizer_config.json").unwrap();
    assert_eq!(t.render(&[], false).unwrap().text, format!("{}['a', 'b', 'a', 'b', 'a', 'b']1024", "=".repeat(20)));
}

/// minijinja 2.12 panicked comparing an integer too large for an f64 with a float (while folding
/// constants: `{{5-5*26-5*26555555555555555555555>555555556-5.26}}`; found by `cargo xtask fuzz
/// --target chat_template`); in a page's worker that panic aborts. minijinja 3.1 compares them;
/// a template may hold such a line and render.
#[test]
fn regression_chat_template_comparing_a_huge_integer_with_a_float() {
    let (t, messages) = fuzzed_template("chat/fuzz_compare_big_int.txt");
    let out = t.render(&messages, true).unwrap();
    assert!(out.text.ends_with("-s~!"), "{:?}", out.text);
    // At run time too, not only when folding constants.
    let t = ChatTemplate::new("{{ ((messages|length + 1) * 9223372036854775807 * 3) > 1.5 }}", None, None, "tokenizer_config.json").unwrap();
    assert_eq!(t.render(&messages, true).unwrap().text, "True");
}
