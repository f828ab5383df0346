//! `cargo xtask make-checkpoint`: a model directory of random weights with the shapes of any
//! config.json (the committed ones in tests/fixtures/configs/ are Llama-3-8B/70B, Phi-3-mini,
//! Mistral-7B), laid out as the Hub ships them: bf16 safetensors shards of at most
//! `--shard-size`, `model.safetensors.index.json`, the config, and a byte-level BPE tokenizer
//! with exactly `vocab_size` entries. Streamed: memory stays a few MB whatever the model's size.
//! Never committed; made on demand for scale runs (`cargo xtask bench --case scale`).

use crate::Result;
use serde_json::{json, Value};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The config.json whose shapes to use (e.g. tests/fixtures/configs/Meta-Llama-3-8B.json).
    #[arg(long)]
    pub config: PathBuf,
    /// The new model directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard, in bytes (the Hub's default is 5 GB).
    #[arg(long, default_value_t = 5_000_000_000)]
    pub shard_size: u64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A tensor to write: its Hugging Face name, shape, and how to fill it.
struct Spec {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform in ±`scale` (weights).
    Random(f32),
    /// Every value 1 (RMSNorm weights, as initialised).
    Ones,
}

impl Spec {
    fn bytes(&self) -> u64 {
        2 * self.shape.iter().product::<usize>() as u64
    }
}

/// The tensors of a decoder model as transformers names them (Llama, Mistral, Qwen2, Phi-3).
fn specs(c: &Value) -> Result<Vec<Spec>> {
    let num = |k: &str| c[k].as_u64().map(|v| v as usize).ok_or_else(|| format!("config.json: no `{k}`"));
    let (h, inter, layers, nh, vocab) = (num("hidden_size")?, num("intermediate_size")?, num("num_hidden_layers")?, num("num_attention_heads")?, num("vocab_size")?);
    let nkv = num("num_key_value_heads").unwrap_or(nh);
    let hd = num("head_dim").unwrap_or(h / nh);
    let model_type = c["model_type"].as_str().unwrap_or("llama");
    let attention_bias = c["attention_bias"].as_bool().unwrap_or(false);
    let qkv_bias = model_type == "qwen2" || attention_bias;
    let o_bias = model_type != "qwen2" && attention_bias;
    let mlp_bias = c["mlp_bias"].as_bool().unwrap_or(false);
    // Weights at the scale of a trained model's (std ≈ 0.02: uniform ±0.035).
    let w = Fill::Random(0.035);
    let mut out = vec![Spec { name: "model.embed_tokens.weight".into(), shape: vec![vocab, h], fill: w }];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let mut linear = |name: &str, rows: usize, cols: usize, bias: bool| {
            out.push(Spec { name: format!("{p}.{name}.weight"), shape: vec![rows, cols], fill: w });
            if bias {
                out.push(Spec { name: format!("{p}.{name}.bias"), shape: vec![rows], fill: w });
            }
        };
        if model_type == "phi3" {
            linear("self_attn.qkv_proj", (nh + 2 * nkv) * hd, h, qkv_bias);
        } else {
            linear("self_attn.q_proj", nh * hd, h, qkv_bias);
            linear("self_attn.k_proj", nkv * hd, h, qkv_bias);
            linear("self_attn.v_proj", nkv * hd, h, qkv_bias);
        }
        linear("self_attn.o_proj", h, nh * hd, o_bias);
        if model_type == "phi3" {
            linear("mlp.gate_up_proj", 2 * inter, h, mlp_bias);
        } else {
            linear("mlp.gate_proj", inter, h, mlp_bias);
            linear("mlp.up_proj", inter, h, mlp_bias);
        }
        linear("mlp.down_proj", h, inter, mlp_bias);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push(Spec { name: format!("{p}.{norm}.weight"), shape: vec![h], fill: Fill::Ones });
        }
    }
    out.push(Spec { name: "model.norm.weight".into(), shape: vec![h], fill: Fill::Ones });
    if !c["tie_word_embeddings"].as_bool().unwrap_or(false) {
        out.push(Spec { name: "lm_head.weight".into(), shape: vec![vocab, h], fill: w });
    }
    Ok(out)
}

/// xorshift64*: fast, seeded, good enough for weights nobody reads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// bf16 of `x` rounded to nearest even, as torch converts.
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Writes one shard: the safetensors header, then each tensor's values, generated in pieces.
fn write_shard(path: &Path, specs: &[&Spec], rng: &mut Rng) -> Result {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for s in specs {
        header.insert(s.name.clone(), json!({ "dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + s.bytes()] }));
        offset += s.bytes();
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned, as the safetensors library writes it.
    while (text.len() + 8) % 8 != 0 {
        text.push(b' ');
    }
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 22, file);
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&text).map_err(io)?;
    let mut piece = Vec::with_capacity(1 << 21);
    for s in specs {
        let mut left = s.bytes() / 2;
        while left > 0 {
            let n = left.min(1 << 20) as usize;
            piece.clear();
            for _ in 0..n {
                let v = match s.fill {
                    Fill::Ones => bf16(1.0),
                    Fill::Random(scale) => bf16(((rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale),
                };
                piece.extend_from_slice(&v.to_le_bytes());
            }
            out.write_all(&piece).map_err(io)?;
            left -= n as u64;
        }
    }
    out.into_inner().map_err(|e| format!("{}: {e}", tmp.display()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A byte-level BPE tokenizer (GPT-2's byte alphabet, no merges, so every byte is a token) with
/// exactly `vocab` entries: the 256 bytes, unused filler tokens, and `<|endoftext|>` last.
fn tokenizer(vocab: usize) -> Result<Value> {
    if vocab < 258 {
        return Err(format!("vocab_size {vocab}: the tokenizer needs at least 258 entries"));
    }
    // GPT-2's printable stand-ins for bytes: printable Latin-1 as itself, the rest from U+0100 up.
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut chars = vec![0u32; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        chars[b as usize] = if printable.contains(&b) {
            b
        } else {
            next += 1;
            next - 1
        };
    }
    let mut map = serde_json::Map::new();
    for (id, &c) in chars.iter().enumerate() {
        map.insert(char::from_u32(c).expect("a valid char").to_string(), json!(id));
    }
    for id in 256..vocab - 1 {
        map.insert(format!("<|unused_{id}|>"), json!(id));
    }
    let eos = vocab - 1;
    map.insert("<|endoftext|>".into(), json!(eos));
    let byte_level = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{ "id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": map, "merges": [] }
    }))
}

pub fn make(a: Args) -> Result {
    let t0 = std::time::Instant::now();
    let text = std::fs::read_to_string(&a.config).map_err(|e| format!("{}: {e}", a.config.display()))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", a.config.display()))?;
    if a.out.exists() {
        return Err(format!("{}: already exists; choose a new directory", a.out.display()));
    }
    let specs = specs(&config)?;
    let vocab = config["vocab_size"].as_u64().unwrap_or(0) as usize;
    // The tokenizer's end-of-text is the last id; the config says so (the real ids may differ).
    config["eos_token_id"] = json!(vocab - 1);
    config["torch_dtype"] = json!("bfloat16");
    // Shards as transformers cuts them: tensors in order, a new shard when the next would overflow.
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut size = 0u64;
    for s in &specs {
        if size > 0 && size + s.bytes() > a.shard_size {
            shards.push(Vec::new());
            size = 0;
        }
        size += s.bytes();
        shards.last_mut().expect("one shard").push(s);
    }
    let tmp = a.out.with_file_name(format!(".{}.tmp", a.out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let total: u64 = specs.iter().map(Spec::bytes).sum();
    let params: u64 = total / 2;
    eprintln!("make-checkpoint: {} tensors, {:.2}B parameters, {:.1} GB of bf16 in {} shard(s)", specs.len(), params as f64 / 1e9, total as f64 / 1e9, shards.len());
    let mut rng = Rng(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut weight_map = serde_json::Map::new();
    let n = shards.len();
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        write_shard(&tmp.join(&name), shard, &mut rng)?;
        for s in shard {
            weight_map.insert(s.name.clone(), json!(name));
        }
        eprintln!("make-checkpoint: wrote {name} ({:.0} s)", t0.elapsed().as_secs_f64());
    }
    let write = |file: &str, v: &Value| std::fs::write(tmp.join(file), serde_json::to_string_pretty(v).expect("json")).map_err(|e| format!("{file}: {e}"));
    if n > 1 {
        write("model.safetensors.index.json", &json!({ "metadata": { "total_size": total }, "weight_map": weight_map }))?;
    }
    write("config.json", &config)?;
    write("tokenizer.json", &tokenizer(vocab)?)?;
    write("tokenizer_config.json", &json!({ "eos_token": "<|endoftext|>", "model_max_length": config["max_position_embeddings"] }))?;
    std::fs::rename(&tmp, &a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    eprintln!("make-checkpoint: {} ready in {:.0} s", a.out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes add up to the parameter counts the models publish.
    #[test]
    fn shapes_give_the_published_parameter_counts() {
        let dir = crate::root().join("tests/fixtures/configs");
        for (file, billions) in [("Meta-Llama-3-8B.json", 8.03), ("Phi-3-mini-4k-instruct.json", 3.82), ("Mistral-7B-v0.1.json", 7.24), ("Meta-Llama-3-70B.json", 70.55)] {
            let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
            let params: u64 = specs(&c).unwrap().iter().map(|s| s.bytes() / 2).sum();
            assert!((params as f64 / 1e9 - billions).abs() < 0.01, "{file}: {params}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    }
}
