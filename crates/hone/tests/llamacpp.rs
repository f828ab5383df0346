//! `hone export --gguf` against llama.cpp (fixtures: tests/reference/make_llamacpp_fixtures.py,
//! llama-cpp-python 0.3.36 built from source). For the tiny llama, mistral, qwen2 and phi3 bases:
//! hone's LoRA GGUF equals the one llama.cpp's own converter writes from the same PEFT adapter,
//! tensor by tensor (rsLoRA aside: there hone writes the alpha that keeps PEFT's scale), and the
//! logits llama.cpp computed with hone's GGUF on the base's GGUF equal hone's own logits with the
//! PEFT adapter.

mod common;

use burn::backend::NdArray;
use hone::export::gguf_lora::lora_to_gguf;
use hone::io::gguf::{GgmlType, Gguf, Value};
use hone::io::safetensors::SafeTensors;
use hone::io::{Dir, FileSource, MemSource};
use hone::lora::peft::Adapter;
use hone::model::load::read_config;
use hone::model::load_model;
use hone::parity::read_ids;
use std::path::PathBuf;

type B = NdArray;
const ARCHS: [&str; 4] = ["llama", "mistral", "qwen2", "phi3"];

fn dir() -> PathBuf {
    common::fixtures().join("llamacpp")
}

fn adapter(arch: &str) -> Adapter {
    Adapter::read(&Dir(dir().join(format!("{arch}_adapter")))).unwrap()
}

fn hone_gguf(arch: &str) -> Gguf {
    let config = read_config(&Dir(common::fixtures().join(arch))).unwrap();
    let out = lora_to_gguf(&adapter(arch), &config, &format!("{arch}_adapter")).unwrap();
    Gguf::open(Box::new(MemSource::new(format!("{arch}.gguf"), out.bytes))).unwrap()
}

fn open(path: PathBuf) -> Gguf {
    Gguf::open(Box::new(FileSource::open(&path).unwrap())).unwrap()
}

/// Largest difference over the largest reference value.
fn max_rel(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours.iter().zip(reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    diff / reference.iter().map(|v| v.abs() as f64).fold(0.0, f64::max)
}

#[test]
fn hone_lora_gguf_equals_llama_cpp_converters() {
    for arch in ARCHS {
        let ours = hone_gguf(arch);
        let theirs = open(dir().join(format!("{arch}_converter.gguf")));
        assert_eq!(ours.tensors.keys().collect::<Vec<_>>(), theirs.tensors.keys().collect::<Vec<_>>(), "{arch}: tensor names");
        for (name, t) in &theirs.tensors {
            let o = &ours.tensors[name];
            assert_eq!((o.dims.clone(), o.kind), (t.dims.clone(), GgmlType::F32), "{arch} {name}: dims and type");
            // Bit for bit: the q/k interleaving is a permutation, nothing is recomputed.
            let (a, b) = (ours.read_f32(name).unwrap().1, theirs.read_f32(name).unwrap().1);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{arch} {name}: values differ");
        }
        for key in ["general.architecture", "general.type", "adapter.type", "general.quantization_version"] {
            assert_eq!(ours.get(key), theirs.get(key), "{arch}: {key}");
        }
        let ad = adapter(arch);
        let alpha = |g: &Gguf| g.get("adapter.lora.alpha").and_then(Value::as_f64).unwrap();
        // llama.cpp's scale is alpha / r; PEFT's rsLoRA scale is alpha / √r, which the converter
        // loses (its GGUF is off by 0.99 relative in llama.cpp's logits; see the fixture script).
        let want = if ad.use_rslora { alpha(&theirs) * (ad.r as f64).sqrt() } else { alpha(&theirs) };
        assert!((alpha(&ours) - want).abs() < 1e-6 * want, "{arch}: alpha {} vs {want}", alpha(&ours));
        assert!((alpha(&ours) / ad.r as f64 - ad.scaling()).abs() < 1e-6, "{arch}: llama.cpp's alpha / r is PEFT's scale");
    }
}

#[test]
fn llama_cpp_running_hone_gguf_gives_hones_logits() {
    let device = Default::default();
    for arch in ARCHS {
        let st = SafeTensors::open(Box::new(FileSource::open(&dir().join(format!("{arch}_logits.safetensors"))).unwrap())).unwrap();
        let ids = read_ids(&st, "ids").unwrap();
        let mut model = load_model::<B>(&Dir(common::fixtures().join(arch)), &device).unwrap();
        adapter(arch).attach(model.linears_mut()).unwrap();
        let ours = model.logits(&ids).into_data().to_vec::<f32>().unwrap();
        let llama_cpp = st.read_f32("llama_cpp").unwrap().1;
        let peft = st.read_f32("peft").unwrap().1;
        let (vs_llama_cpp, vs_peft) = (max_rel(&ours, &llama_cpp), max_rel(&ours, &peft));
        eprintln!("{arch}: hone vs llama.cpp (hone's GGUF) {vs_llama_cpp:.2e}, vs PEFT {vs_peft:.2e} (max |Δ| / max |ref|)");
        assert!(vs_llama_cpp < 1e-4, "{arch}: {vs_llama_cpp:.2e}");
        assert!(vs_peft < 1e-4, "{arch}: {vs_peft:.2e}");
    }
}

/// What llama.cpp cannot take, said before a file is written, naming the module.
#[test]
fn adapters_llama_cpp_cannot_load_are_refused_by_name() {
    // The llama adapter on the phi3 base: phi3 has no q_proj.
    let phi3 = read_config(&Dir(common::fixtures().join("phi3"))).unwrap();
    let err = lora_to_gguf(&adapter("llama"), &phi3, "x").unwrap_err().to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj"), "{err}");
    assert!(err.contains("another model"), "{err}");
    // Shapes that do not fit: the llama adapter on a base with a wider hidden size.
    let mut wide = read_config(&Dir(common::fixtures().join("llama"))).unwrap();
    wide.hidden_size *= 2;
    let err = lora_to_gguf(&adapter("llama"), &wide, "x").unwrap_err().to_string();
    assert!(err.contains("do not fit the base's"), "{err}");
    // lm_head of a base whose output weight is the embedding table.
    let mut ad = adapter("llama");
    let mut tied = read_config(&Dir(common::fixtures().join("llama"))).unwrap();
    tied.tie_word_embeddings = true;
    let mut head = ad.layers[0].clone();
    head.module = "lm_head".into();
    head.a_shape = [ad.r, tied.hidden_size];
    head.a = vec![0.5; ad.r * tied.hidden_size];
    head.b_shape = [tied.vocab_size, ad.r];
    head.b = vec![0.5; ad.r * tied.vocab_size];
    ad.layers.push(head);
    let err = lora_to_gguf(&ad, &tied, "x").unwrap_err().to_string();
    assert!(err.contains("tied embeddings") && err.contains("hone merge"), "{err}");
    // Untied, the head is exported as llama.cpp's output weight.
    let untied = read_config(&Dir(common::fixtures().join("llama"))).unwrap();
    let g = lora_to_gguf(&ad, &untied, "x").unwrap();
    let g = Gguf::open(Box::new(MemSource::new("x.gguf", g.bytes))).unwrap();
    assert_eq!(g.tensors["output.weight.lora_b"].dims, vec![ad.r, untied.vocab_size]);
}
