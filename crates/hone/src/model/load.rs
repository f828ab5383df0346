//! Loading a Hugging Face model directory (any [`FileSet`]): `config.json`, then the weights
//! tensor by tensor from `model.safetensors` or the shards named by
//! `model.safetensors.index.json`. Each tensor is read, checked against the config, converted
//! to f32 and moved to the device before the next is read.

use super::config::{Arch, Config};
use super::decoder::{Attention, Body, CausalLm, DecoderLayer, Mlp, RmsNorm};
use super::placement::Placement;
use crate::lora::LoraLinear;
use crate::quant::nf4::Nf4Builder;
use crate::ops::HoneBackend;
use crate::quant::frozen::{PackedWeight, StoredFloat};
use crate::quant::{bnb, FrozenWeight, Nf4Weight};
use crate::error::{Error, Result};
use crate::io::safetensors::Dtype;
use crate::io::weights::Weights;
use crate::io::FileSet;

pub const CONFIG_FILE: &str = "config.json";

pub fn read_config(files: &dyn FileSet) -> Result<Config> {
    let src = files.open_required(CONFIG_FILE)?;
    Config::from_json(&src.read_all()?, src.name())
}

/// How the frozen base is held on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Quantize every linear layer of the decoder blocks to NF4 while loading (QLoRA);
    /// embeddings, norms and lm_head are not quantized, as bitsandbytes does (embeddings and
    /// lm_head stay in the checkpoint's precision, norms in f32).
    pub nf4: Option<Nf4Options>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { nf4: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Options {
    pub blocksize: usize,
    pub double_quant: bool,
}

impl Default for Nf4Options {
    fn default() -> Self {
        Nf4Options { blocksize: 64, double_quant: true }
    }
}

/// Loads a model from a directory-like file set onto `device`, unquantized.
pub fn load_model<B: HoneBackend>(files: &dyn FileSet, device: &B::Device) -> Result<CausalLm<B>> {
    load_model_with(files, LoadOptions::default(), device)
}

pub fn load_model_with<B: HoneBackend>(files: &dyn FileSet, options: LoadOptions, device: &B::Device) -> Result<CausalLm<B>> {
    let config = read_config(files)?;
    let weights = Weights::open(files)?;
    build(config, &weights, options, device)
}

/// Where the loader gets tensors by their Hugging Face names: safetensors shards, or a GGUF file
/// (model::gguf) that maps the names and undoes llama.cpp's layout.
pub trait TensorSource {
    fn location(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    /// Every tensor the source holds, under its own names (for checks against the config).
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    /// The file that holds `name` (a shard of a sharded checkpoint).
    fn file_of(&self, _name: &str) -> String {
        self.location()
    }
    /// The name the source stores the tensor `name` (a Hugging Face name) under, as
    /// [`TensorSource::names`] lists it.
    fn stored_name(&self, name: &str) -> String {
        name.to_string()
    }
    /// A floating-point tensor as f32, checked against `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// A stored tensor's raw bytes (for bitsandbytes' parts); `None` when not stored.
    fn raw(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// A frozen tensor's values as stored, in i32 words (see [`PackedWeight`]): bf16 and f16
    /// stay 16-bit, two per word; anything else arrives as f32 bits. By default from `read`.
    fn read_packed(&self, name: &str, shape: &[usize]) -> Result<(StoredFloat, Vec<i32>)> {
        Ok((StoredFloat::F32, self.read(name, shape)?.into_iter().map(|v| v.to_bits() as i32).collect()))
    }
    /// As `read`, in pieces of `chunk` values, for sources that can (the whole tensor at once
    /// otherwise).
    fn read_chunks(&self, name: &str, shape: &[usize], _chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        f(&self.read(name, shape)?)
    }
}

/// Values per piece when quantizing while loading: 16 MB of f32, whole NF4 blocks.
const LOAD_CHUNK: usize = 1 << 22;

impl TensorSource for Weights {
    fn location(&self) -> String {
        Weights::location(self).to_string()
    }
    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
    fn names(&self) -> Vec<String> {
        Weights::names(self).cloned().collect()
    }
    fn file_of(&self, name: &str) -> String {
        self.info(name).map_or_else(|| self.location().to_string(), |(st, _)| st.name().to_string())
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Weights::read(self, name, shape)
    }
    fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.info(name) {
            Some((st, _)) => st.read_raw(name).map(|(_, b)| Some(b)),
            None => Ok(None),
        }
    }
    fn read_chunks(&self, name: &str, shape: &[usize], chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        Weights::read_chunks(self, name, shape, chunk, f)
    }
    /// The file's bytes as they are, for f32, bf16 and f16 (16-bit rows of odd length, which
    /// would straddle words, are widened to f32).
    fn read_packed(&self, name: &str, shape: &[usize]) -> Result<(StoredFloat, Vec<i32>)> {
        let (dtype, words) = self.read_words(name, shape)?;
        let cols = shape.last().copied().unwrap_or(1);
        let format = match dtype {
            Dtype::F32 => StoredFloat::F32,
            Dtype::BF16 if cols % 2 == 0 => StoredFloat::BF16,
            Dtype::F16 if cols % 2 == 0 => StoredFloat::F16,
            _ => return Ok((StoredFloat::F32, Weights::read(self, name, shape)?.into_iter().map(|v| v.to_bits() as i32).collect())),
        };
        Ok((format, words))
    }
}

/// A frozen table (embeddings, an untied lm_head) in the checkpoint's precision, split into
/// parts that fit the device's largest buffer.
/// `lookup_only`: the table is only read by row (untied embeddings), so backends that keep such
/// tables in host memory do.
fn table<B: HoneBackend>(w: &dyn TensorSource, name: &str, shape: [usize; 2], lookup_only: bool, device: &B::Device) -> Result<FrozenWeight<B>> {
    let (format, words) = w.read_packed(name, &shape)?;
    let packed = if lookup_only && B::tables_on_host() {
        PackedWeight::on_host(words, shape[0], shape[1], format, device)
    } else {
        PackedWeight::from_words(words, shape[0], shape[1], format, crate::ops::max_buffer_bytes(), device)
    }
    .map_err(|m| Error::tensor(w.location(), name, m))?;
    Ok(FrozenWeight::packed(packed))
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(w: &dyn TensorSource, name: &str, shape: [usize; D], device: &B::Device) -> Result<burn::tensor::Tensor<B, D>> {
    let values = w.read(name, &shape)?;
    Ok(burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, shape), device))
}

pub fn build<B: HoneBackend>(config: Config, w: &dyn TensorSource, options: LoadOptions, device: &B::Device) -> Result<CausalLm<B>> {
    build_with_report(config, w, options, device).map(|(m, _)| m)
}

/// What quantizing while loading cost: ‖deq(NF4(W)) − W‖ / ‖W‖ over all quantized weights.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadReport {
    pub nf4_rel_error: Option<f64>,
}

pub fn build_with_report<B: HoneBackend>(config: Config, w: &dyn TensorSource, options: LoadOptions, device: &B::Device) -> Result<(CausalLm<B>, LoadReport)> {
    let placement = Placement::single(device.clone(), config.num_hidden_layers);
    build_placed(config, w, options, &placement)
}

/// As [`build_with_report`], each part of the model created on the device `placement` gives it
/// (several GPUs of one host when one is too small).
pub fn build_placed<B: HoneBackend>(config: Config, w: &dyn TensorSource, options: LoadOptions, placement: &Placement<B::Device>) -> Result<(CausalLm<B>, LoadReport)> {
    if placement.layers.len() != config.num_hidden_layers {
        return Err(Error::unsupported("device map", format!("places {} layers; the model has {}", placement.layers.len(), config.num_hidden_layers)));
    }
    check_layer_count(&config, w)?;
    let recorder = Recorder { inner: w, read: Default::default() };
    let built = build_recorded(config, &recorder, options, placement)?;
    check_all_used(&recorder)?;
    Ok(built)
}

fn build_recorded<B: HoneBackend>(config: Config, w: &dyn TensorSource, options: LoadOptions, placement: &Placement<B::Device>) -> Result<(CausalLm<B>, LoadReport)> {
    let err = std::cell::Cell::new((0f64, 0f64));
    let c = &config;
    let (h, hd, nh, nkv, inter) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
    // Decoder-block linears: quantized one by one as they are read, if asked.
    let linear = |name: &str, d_out: usize, d_in: usize, bias: bool, device: &B::Device| -> Result<LoraLinear<B>> {
        let key = format!("{name}.weight");
        if c.bnb_nf4 {
            // Pre-quantized by bitsandbytes: taken as stored, never requantized.
            let q = bnb::deserialize(&key, |k| w.raw(k).map_err(|e| e.to_string()))
            .map_err(|m| Error::tensor(w.location(), &key, m))?;
            if q.shape != [d_out, d_in] {
                return Err(Error::tensor(w.location(), &key, format!("quantized shape {:?} does not match the config's [{d_out}, {d_in}]", q.shape)));
            }
            let bias = if bias { Some(tensor::<B, _>(w, &format!("{name}.bias"), [d_out], device)?) } else { None };
            return Ok(LoraLinear::new(FrozenWeight::nf4(Nf4Weight::from_host(&q, device)), bias));
        }
        let weight = match options.nf4 {
            Some(o) => {
                // Streamed: a piece of the weight at a time, never the whole of it in f32.
                let bad = |m: String| Error::tensor(w.location(), &key, m);
                let mut builder = Nf4Builder::new(&[d_out, d_in], o.blocksize, o.double_quant).map_err(bad)?;
                let chunk = LOAD_CHUNK / o.blocksize * o.blocksize;
                w.read_chunks(&key, &[d_out, d_in], chunk, &mut |piece| builder.push(piece).map_err(bad))?;
                let (q, (d, n)) = builder.finish().map_err(bad)?;
                let (diff, norm) = err.get();
                err.set((diff + d, norm + n));
                FrozenWeight::nf4(Nf4Weight::from_host(&q, device))
            }
            None => FrozenWeight::dense(tensor::<B, _>(w, &key, [d_out, d_in], device)?),
        };
        let bias = if bias { Some(tensor::<B, _>(w, &format!("{name}.bias"), [d_out], device)?) } else { None };
        Ok(LoraLinear::new(weight, bias))
    };
    let norm = |name: &str, device: &B::Device| -> Result<RmsNorm<B>> { Ok(RmsNorm { weight: tensor::<B, _>(w, &format!("{name}.weight"), [h], device)?, eps: c.rms_norm_eps }) };

    // Tied: the table is also the head's weight.
    let tied = c.tie_word_embeddings && !w.contains("lm_head.weight");
    let embed_tokens = table::<B>(w, "model.embed_tokens.weight", [c.vocab_size, h], !tied, &placement.embed)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let device = &placement.layers[i];
        let fused = c.arch == Arch::Phi3;
        let attn = |n: &str| format!("{p}.self_attn.{n}");
        let mlp = |n: &str| format!("{p}.mlp.{n}");
        let self_attn = Attention {
            q_proj: if fused { None } else { Some(linear(&attn("q_proj"), nh * hd, h, c.qkv_bias, device)?) },
            k_proj: if fused { None } else { Some(linear(&attn("k_proj"), nkv * hd, h, c.qkv_bias, device)?) },
            v_proj: if fused { None } else { Some(linear(&attn("v_proj"), nkv * hd, h, c.qkv_bias, device)?) },
            qkv_proj: if fused { Some(linear(&attn("qkv_proj"), (nh + 2 * nkv) * hd, h, c.qkv_bias, device)?) } else { None },
            o_proj: linear(&attn("o_proj"), h, nh * hd, c.o_bias, device)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let mlp = Mlp {
            gate_proj: if fused { None } else { Some(linear(&mlp("gate_proj"), inter, h, c.mlp_bias, device)?) },
            up_proj: if fused { None } else { Some(linear(&mlp("up_proj"), inter, h, c.mlp_bias, device)?) },
            gate_up_proj: if fused { Some(linear(&mlp("gate_up_proj"), 2 * inter, h, c.mlp_bias, device)?) } else { None },
            down_proj: linear(&mlp("down_proj"), h, inter, c.mlp_bias, device)?,
        };
        layers.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: norm(&format!("{p}.input_layernorm"), device)?,
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"), device)?,
        });
    }
    let norm_final = norm("model.norm", &placement.head)?;
    // Some tied checkpoints still store lm_head; tied ones that do not reuse the embeddings.
    let lm_head = if tied {
        None
    } else {
        Some(LoraLinear::new(table::<B>(w, "lm_head.weight", [c.vocab_size, h], false, &placement.head)?, None))
    };
    let (diff, norm) = err.get();
    let report = LoadReport { nf4_rel_error: (options.nf4.is_some() && norm > 0.0).then(|| (diff / norm).sqrt()) };
    Ok((CausalLm { model: Body { embed_tokens, layers, norm: norm_final }, lm_head, config }, report))
}

/// The decoder layer a stored tensor belongs to, under Hugging Face's names or llama.cpp's.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.").or_else(|| name.strip_prefix("blk."))?;
    rest.split('.').next()?.parse().ok()
}

/// Weights of a layer the config does not have are not dropped without a word: the config
/// belongs to another model (or the weights do), so nothing is loaded. Missing or mis-shaped
/// tensors are found by name as they are read.
fn check_layer_count(config: &Config, w: &dyn TensorSource) -> Result<()> {
    let n = config.num_hidden_layers;
    let beyond = w.names().into_iter().filter_map(|name| Some((layer_of(&name)?, name))).filter(|(layer, _)| *layer >= n);
    match beyond.min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1))) {
        Some((layer, name)) => Err(Error::tensor(
            w.file_of(&name),
            name,
            format!("is a tensor of layer {layer}, but the config (config.json's num_hidden_layers, or a GGUF file's block_count) has {n} layers: the config does not match these weights"),
        )),
        None => Ok(()),
    }
}

/// A source that notes the names read from it, so that what a build left unread can be named.
struct Recorder<'a> {
    inner: &'a dyn TensorSource,
    read: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Recorder<'_> {
    fn note(&self, name: &str) {
        self.read.borrow_mut().insert(self.inner.stored_name(name));
    }
}

impl TensorSource for Recorder<'_> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn file_of(&self, name: &str) -> String {
        self.inner.file_of(name)
    }
    fn stored_name(&self, name: &str) -> String {
        self.inner.stored_name(name)
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.note(name);
        self.inner.read(name, shape)
    }
    fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.note(name);
        self.inner.raw(name)
    }
    fn read_packed(&self, name: &str, shape: &[usize]) -> Result<(StoredFloat, Vec<i32>)> {
        self.note(name);
        self.inner.read_packed(name, shape)
    }
    fn read_chunks(&self, name: &str, shape: &[usize], chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        self.note(name);
        self.inner.read_chunks(name, shape, chunk, f)
    }
}

/// Stored tensors no model reads: rotary tables older checkpoints kept as buffers (hone, like
/// transformers, computes them from the config), and llama.cpp's per-frequency rope factors,
/// which the GGUF's config already holds ([`crate::model::gguf::config_from_gguf`]).
fn derived(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name == "rope_freqs.weight"
}

/// A stored tensor the model did not read means the config describes another model than the
/// weights (a bias config.json says is absent, an extra projection): refused by name rather than
/// trained without it. Parts of a read tensor (bitsandbytes' quant state, `<weight>.absmax`…)
/// count as read.
fn check_all_used(w: &Recorder) -> Result<()> {
    let read = w.read.borrow();
    let used = |name: &str| read.contains(name) || name.match_indices('.').any(|(i, _)| read.contains(&name[..i]));
    let mut unused: Vec<String> = w.names().into_iter().filter(|n| !derived(n) && !used(n)).collect();
    unused.sort();
    match unused.first() {
        None => Ok(()),
        Some(first) => Err(Error::tensor(
            w.file_of(first),
            first,
            format!(
                "is stored but not part of the model the config describes ({} such tensor{} in all{}): the config does not match these weights (a bias or layer it leaves out?)",
                unused.len(),
                if unused.len() == 1 { "" } else { "s" },
                if unused.len() > 1 { format!(", e.g. also {}", unused[1..].iter().take(3).cloned().collect::<Vec<_>>().join(", ")) } else { String::new() },
            ),
        )),
    }
}

/// Whether `name` is the weight of a linear layer inside a decoder block (what QLoRA quantizes;
/// embeddings, norms and lm_head are not).
pub fn is_decoder_linear(name: &str) -> bool {
    const PROJ: [&str; 9] = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"];
    let Some(rest) = name.strip_prefix("model.layers.") else { return false };
    let mut parts = rest.split('.');
    let (Some(index), Some(block), Some(proj), Some("weight"), None) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    index.parse::<usize>().is_ok() && (block == "self_attn" || block == "mlp") && PROJ.contains(&proj)
}
