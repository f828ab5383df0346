//! Streamed loading: a synthetic sharded checkpoint with two Llama-3-70B-sized decoder layers
//! (hidden 8192, intermediate 28672, 64 heads, 8 KV heads; 6.9 GB of f32 in two shards) loads
//! and quantizes to NF4 with the process's peak RSS under 2.5 times its largest tensor (the
//! 939 MB MLP weight), and each NF4 weight equals the whole-tensor quantization. One test per
//! binary: peak RSS is the process's.

use burn::backend::NdArray;
use hone::io::Dir;
use hone::model::{load_model_with, LoadOptions, Nf4Options};
use hone::quant::{Nf4Tensor, Nf4Weight};
use std::io::Write;
use std::path::Path;

const HIDDEN: usize = 8192;
const INTER: usize = 28672;
const HEADS: usize = 64;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 256;
const LAYERS: usize = 2;

/// Element `i` of tensor `t`: a hash, so any piece can be made again without the rest.
fn value(t: u64, i: u64) -> f32 {
    let mut z = (t << 40) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
}

fn tensors_of_layer(i: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("model.layers.{i}");
    vec![
        (format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
        (format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER]),
        (format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN]),
        (format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN]),
        (format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
        (format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN]),
        (format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]),
        (format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]),
        (format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN]),
    ]
}

fn tensor_id(name: &str) -> u64 {
    name.bytes().fold(1469598103934665603u64, |h, b| (h ^ b as u64).wrapping_mul(1099511628211))
}

/// Writes one safetensors shard, generating each tensor piece by piece.
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * 4;
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    let mut buf = Vec::with_capacity(1 << 22);
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let id = tensor_id(name);
        let norm = name.ends_with("norm.weight");
        for start in (0..n).step_by(1 << 20) {
            buf.clear();
            for i in start..(start + (1 << 20)).min(n) {
                let v = if norm { 1.0 } else { value(id, i as u64) };
                buf.extend_from_slice(&v.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    f.flush().unwrap();
}

/// A field of /proc/self/status in bytes: VmHWM (peak RSS) or VmRSS (now).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

#[test]
fn seventy_b_sized_layers_load_within_a_small_multiple_of_the_largest_tensor() {
    let dir = std::env::temp_dir().join(format!("hone-streamed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let mut shards = vec![
        [vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])], tensors_of_layer(0)].concat(),
        [tensors_of_layer(1), vec![("model.norm.weight".to_string(), vec![HIDDEN])]].concat(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (k, tensors) in shards.iter_mut().enumerate() {
        tensors.sort();
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, LAYERS);
        write_shard(&dir.join(&file), tensors);
        for (name, _) in tensors.iter() {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(&serde_json::json!({"weight_map": weight_map})).unwrap()).unwrap();
    let largest = (INTER * HIDDEN * 4) as u64;

    let before = peak_rss_bytes();
    let started = std::time::Instant::now();
    let model = load_model_with::<NdArray>(&Dir(dir.clone()), LoadOptions { nf4: Some(Nf4Options::default()) }, &Default::default()).unwrap();
    let peak = peak_rss_bytes();
    let kept = status_bytes("VmRSS:");
    println!(
        "loaded and quantized {LAYERS} layers in {:.1}s: peak RSS {:.0} MB (before loading {:.0} MB; after, with the NF4 model on this CPU device, {:.0} MB), largest tensor {:.0} MB, ratio {:.2}",
        started.elapsed().as_secs_f64(),
        peak as f64 / 1e6,
        before as f64 / 1e6,
        kept as f64 / 1e6,
        largest as f64 / 1e6,
        peak as f64 / largest as f64
    );
    assert!((peak as f64) < 2.5 * largest as f64, "peak RSS {peak} bytes is not under 2.5 x {largest}");
    // Beyond what the model keeps (here on the CPU; on a GPU it is device memory), loading held
    // less than one more tensor's worth at any time: the bound does not grow with the model.
    assert!(peak.saturating_sub(kept) < largest, "loading held {} bytes beyond the model", peak - kept);

    // Each kind of weight, quantized whole, equals what streaming made (device words and absmax).
    let linears = model.linears();
    for name in ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"] {
        let (_, lin) = linears.iter().find(|(n, _)| n == name).unwrap();
        let shape = [lin.out_features(), lin.in_features()];
        let id = tensor_id(&format!("{name}.weight"));
        let whole: Vec<f32> = (0..shape[0] * shape[1]).map(|i| value(id, i as u64)).collect();
        let q = Nf4Tensor::quantize(&whole, &shape, 64, true).unwrap();
        drop(whole);
        let want = Nf4Weight::<NdArray>::from_host(&q, &Default::default());
        let got = lin.weight.nf4.as_ref().expect("quantized");
        assert_eq!(got.words.to_data(), want.words.to_data(), "{name}: codes");
        assert_eq!(got.absmax_codes.as_ref().unwrap().to_data(), want.absmax_codes.as_ref().unwrap().to_data(), "{name}: absmax codes");
        assert_eq!(got.nested.as_ref().unwrap().to_data(), want.nested.as_ref().unwrap().to_data(), "{name}: nested absmax and offset");
    }
    drop(linears);
    drop(model);
    std::fs::remove_dir_all(&dir).unwrap();
}
