//! How much memory a run needs, from config.json alone (before any weight is read), so that the
//! page can say "this model does not fit" up front and the CLI can plan a big job.
//!
//! The base: NF4 decoder linears as hone keeps them on every device (4-bit codes packed in i32
//! words, and bitsandbytes' double-quantized absmax in its 8-bit form: a byte per 64 weights,
//! an f32 scale per 256 blocks), embeddings and an untied lm_head in the checkpoint's precision
//! (`torch_dtype`: bf16/f16 stay 16-bit), f32 norms. LoRA: A and B and their gradients in f32,
//! AdamW's two moments in f32 or, with 8-bit AdamW, a byte each per value (in blocks of 256
//! with an f32 absmax; tensors under `min_8bit_size` keep f32). Activations: what the backward pass
//! keeps (with checkpointing, the layer inputs and one layer at a time), plus the logits and
//! their gradient (one piece of them with chunked cross-entropy).

use crate::lora::LoraConfig;
use crate::model::{Arch, Config};
use crate::train::optim::Optim;

/// Where the run's tensors live, which changes what the ops keep and whether the process
/// itself counts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Device {
    /// wgpu (WebGPU, Vulkan, Metal) and CUDA.
    Gpu,
    /// The NdArray CPU backend: its fused ops keep fewer intermediates, and the process itself
    /// (code, tokenizer, allocator) counts, since memory here is RSS.
    Cpu,
}

/// Process memory of the `hone` binary on the CPU backend besides the run's tensors (code,
/// thread pools, allocator slack), and per vocabulary entry (the tokenizer's tables), fitted to
/// peak RSS measured on the tiny fixture and SmolLM2 (hone-cli/tests/plan.rs checks them).
/// Most of the first is code: at the end of a run the binary's resident file pages were
/// 17.9–18.9 MB in a release build and 29.4–30.1 MB in a dev build (the tests' build), whose
/// anonymous memory is also ~2.4 MB larger, so the figure follows the build (measured on the
/// tiny fixture: peak RSS 25.0 MB release, 37.9–39.2 MB dev).
pub const CPU_RUNTIME_BYTES: u64 = if cfg!(debug_assertions) { 34_600_000 } else { 21_000_000 };
pub const CPU_BYTES_PER_VOCAB_ENTRY: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    pub batch: usize,
    /// Longest sequence in a micro-batch.
    pub seq: usize,
    pub nf4: bool,
    /// Activation checkpointing per decoder layer (with chunked cross-entropy).
    pub checkpointing: bool,
    pub device: Device,
    /// Logits per piece of the chunked cross-entropy (see TrainConfig::logits_chunk).
    pub logits_chunk: usize,
    pub optim: Optim,
    /// With 8-bit AdamW, tensors under this many values keep f32 moments.
    pub min_8bit_size: usize,
    /// An untied embedding table kept in host memory (GPU backends, the page's included: see
    /// `HoneBackend::tables_on_host`).
    pub host_tables: bool,
}

impl PlanOptions {
    pub fn new(batch: usize, seq: usize, nf4: bool) -> Self {
        PlanOptions {
            batch,
            seq,
            nf4,
            checkpointing: true,
            device: Device::Gpu,
            logits_chunk: crate::train::trainer::LOGITS_CHUNK,
            optim: Optim::AdamW,
            min_8bit_size: crate::train::adamw8bit::MIN_8BIT_SIZE,
            host_tables: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    /// NF4 codes of the decoder linears.
    pub nf4_codes_bytes: u64,
    /// Their per-block absmax (double-quantized: a byte per block, a scale per 256 blocks).
    pub nf4_stats_bytes: u64,
    /// Unquantized weights: embeddings, lm_head (in the checkpoint's precision), norms (and
    /// every linear without NF4, in f32).
    pub dense_bytes: u64,
    /// An untied embedding table kept in host memory, not on the device (not in `total_bytes`,
    /// which is the device's memory on GPU backends).
    pub host_table_bytes: u64,
    pub base_bytes: u64,
    pub lora_params: u64,
    pub lora_weight_bytes: u64,
    pub lora_grad_bytes: u64,
    /// AdamW's two moments (f32, or 8-bit blockwise).
    pub optimizer_bytes: u64,
    pub optim: Optim,
    /// LoRA weights, gradients and optimizer moments.
    pub lora_bytes: u64,
    /// What the backward pass keeps: every layer's activations, or with checkpointing the
    /// layer inputs plus one layer's activations.
    pub activation_bytes: u64,
    /// Logits and their gradient at the peak (one piece of them with chunked cross-entropy).
    pub logits_bytes: u64,
    /// Chunks of frozen weights unpacked for a product, and the process itself on the CPU.
    pub workspace_bytes: u64,
    pub total_bytes: u64,
    /// The biggest single buffer that cannot be split (a GPU's maxBufferSize and
    /// maxStorageBufferBindingSize must hold it; frozen tables are split into parts that fit).
    pub largest_buffer_bytes: u64,
    /// What it is: the tensor's name where it is one.
    pub largest_buffer: String,
    pub checkpointing: bool,
}

/// Every decoder linear as (HF module name, in, out).
pub fn linear_shapes(c: &Config) -> Vec<(String, u64, u64)> {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, i_: u64, o: u64| out.push((format!("{p}.{name}"), i_, o));
        if c.arch == Arch::Phi3 {
            add("self_attn.qkv_proj", h, q + 2 * kv);
            add("mlp.gate_up_proj", h, 2 * i);
        } else {
            add("self_attn.q_proj", h, q);
            add("self_attn.k_proj", h, kv);
            add("self_attn.v_proj", h, kv);
            add("mlp.gate_proj", h, i);
            add("mlp.up_proj", h, i);
        }
        add("self_attn.o_proj", q, h);
        add("mlp.down_proj", i, h);
    }
    out
}

/// Device bytes of NF4 storage for `n` weights (blocks of 64, double quantization, as hone
/// quantizes): codes in i32 words, the absmax codes 4 per word, the nested scales and offset.
pub fn nf4_bytes(n: u64) -> u64 {
    nf4_code_bytes(n) + nf4_stat_bytes(n)
}

fn nf4_code_bytes(n: u64) -> u64 {
    4 * n.div_ceil(8)
}

fn nf4_stat_bytes(n: u64) -> u64 {
    let blocks = n.div_ceil(64);
    4 * blocks.div_ceil(4) + 4 * (blocks.div_ceil(256) + 1)
}

/// Bytes per value of the frozen tables (embeddings, lm_head) as hone keeps them: the
/// checkpoint's 16-bit precision stays 16-bit (rows of odd length are widened to f32).
pub fn table_value_bytes(c: &Config) -> u64 {
    match c.dtype.as_deref() {
        Some("bfloat16" | "float16" | "bf16" | "fp16" | "half") if c.hidden_size % 2 == 0 => 2,
        _ => 4,
    }
}

/// The plan for a QLoRA (or LoRA) run on a GPU with checkpointing on, hone's default.
pub fn estimate(c: &Config, lora: &LoraConfig, batch: usize, seq: usize, nf4: bool) -> MemoryPlan {
    plan(c, lora, &PlanOptions::new(batch, seq, nf4))
}

/// Whether the run keeps the embedding table in host memory: untied, on a native GPU backend.
fn embed_on_host(c: &Config, o: &PlanOptions) -> bool {
    o.host_tables && o.device == Device::Gpu && !c.tie_word_embeddings
}

pub fn plan(c: &Config, lora: &LoraConfig, o: &PlanOptions) -> MemoryPlan {
    let linears = linear_shapes(c);
    let (v, h, layers) = (c.vocab_size as u64, c.hidden_size as u64, c.num_hidden_layers as u64);
    let embed = v * h * table_value_bytes(c);
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let norms = (2 * layers + 1) * h * 4;
    let (nf4_codes_bytes, nf4_stats_bytes, dense_linears) = if o.nf4 {
        let codes = linears.iter().map(|(_, i, o_)| nf4_code_bytes(i * o_)).sum();
        let stats = linears.iter().map(|(_, i, o_)| nf4_stat_bytes(i * o_)).sum();
        (codes, stats, 0)
    } else {
        (0, 0, linears.iter().map(|(_, i, o_)| i * o_ * 4).sum())
    };
    let host_table_bytes = if embed_on_host(c, o) { embed } else { 0 };
    let dense_bytes = embed - host_table_bytes + head + norms + dense_linears;
    let base_bytes = nf4_codes_bytes + nf4_stats_bytes + dense_bytes;

    let adapted: Vec<(u64, u64)> = linears.iter().filter(|(n, _, _)| lora.targets.matches(n)).map(|(_, i, o_)| (*i, *o_)).collect();
    // DoRA: a magnitude per output row of each adapted linear (trained), and the base's squared
    // row norms beside it (frozen).
    let dora_rows: u64 = if lora.use_dora { adapted.iter().map(|(_, o_)| o_).sum() } else { 0 };
    let lora_params: u64 = adapted.iter().map(|(i, o_)| lora.r as u64 * (i + o_)).sum::<u64>() + dora_rows;
    let moments = |n: u64| match o.optim {
        Optim::AdamW8bit if n >= o.min_8bit_size as u64 => {
            let blocks = n.div_ceil(crate::train::adamw8bit::BLOCK as u64);
            2 * (blocks * crate::train::adamw8bit::BLOCK as u64 + 4 * blocks)
        }
        _ => 8 * n,
    };
    let optimizer_bytes: u64 = adapted
        .iter()
        .map(|(i, o_)| moments(lora.r as u64 * i) + moments(lora.r as u64 * o_) + if lora.use_dora { moments(*o_) } else { 0 })
        .sum();
    let (lora_weight_bytes, lora_grad_bytes) = (lora_params * 4 + dora_rows * 4, lora_params * 4);
    let lora_bytes = lora_weight_bytes + lora_grad_bytes + optimizer_bytes;

    let (rows, seq) = (o.batch as u64, o.seq as u64);
    let tokens = rows * seq;
    let (i, q) = (c.intermediate_size as u64, (c.num_attention_heads * c.head_dim) as u64);
    // One layer's autodiff graph, per token: the norms' intermediates, q/k/v and RoPE's copies,
    // attention output, the MLP's gate/up/activation/product; attention probabilities per head
    // and key position. (Coefficients from peak RSS measured on
    // SmolLM2 with checkpointing off, batch × length 4×128, 2×256, 4×256.)
    // The CPU backend's fused ops (attention, SwiGLU, RMSNorm) keep fewer intermediates: the
    // attention probabilities alone per head and key, no RoPE or head-layout copies (fitted to
    // SmolLM2 with checkpointing off, 2×128, 4×128, 2×256: 891, 1493, 1567 MB measured).
    // On GPU backends attention is one graph node as well (`ops::reference::self_attention`):
    // the probabilities plus one layer's backward transients, as on the CPU. Measured on
    // lavapipe (wgpu; host memory, so peak RSS), SmolLM2 1×512 with checkpointing off: 2197 MB
    // against 2228 MB planned; before the node (12 bytes per head and key) 2836 MB.
    let per_token = match o.device {
        Device::Gpu => 4 * (7 * h + 8 * q + 6 * i) + 8 * c.num_attention_heads as u64 * seq,
        Device::Cpu => 4 * (5 * h + 6 * q + 5 * i) + 8 * c.num_attention_heads as u64 * seq,
    };
    // DoRA keeps each adapted linear's output before the magnitude scales it (for the
    // magnitude's gradient): one more value per token and adapted output row in the layer.
    let layer_graph = tokens * (per_token + 4 * dora_rows / layers.max(1));
    let all_logits = tokens * v * 4;
    // Logits-sized buffers alive at once: the logits, their gradient, and on GPU backends the
    // head product's transposed copy (the CPU backend writes it contiguous since its frozen
    // matmul is one GEMM on the stored weight; SmolLM2 2×128 measured 470 MB, see
    // hone-cli/tests/plan.rs).
    let copies = match o.device {
        Device::Gpu => 3,
        Device::Cpu => 2,
    };
    let (activation_bytes, logits_bytes) = if o.checkpointing {
        // Saved layer inputs, one layer's graph being back-propagated, the gradient flowing down.
        let positions = (o.logits_chunk as u64 / (rows * v).max(1)).clamp(1, seq.max(1));
        let piece = rows * positions * v * 4;
        ((layers + 1) * tokens * h * 4 + layer_graph + 2 * tokens * h * 4, copies * piece)
    } else {
        (layers * layer_graph, copies * all_logits)
    };
    // No NF4 linear is ever dequantized whole: GPU kernels decode inside the product (shapes
    // whose rows are not whole words of codes, which no real model has, aside), the CPU's
    // AVX2, AVX-512 and NEON kernels decode into their tiles, and elsewhere the CPU
    // dequantizes a chunk of rows at a time (one chunk buffer). Unquantized, the largest linear
    // is a buffer.
    let largest_linear = linears.iter().map(|(_, i, o_)| i * o_ * 4).max().unwrap_or(0);
    let nf4_chunk = if o.nf4 && o.device == Device::Cpu { (crate::ops::packed::CHUNK_BYTES as u64).min(largest_linear) } else { 0 };
    // The first of the largest, so the name is the lowest layer's.
    let (largest_name, largest_codes) = linears.iter().map(|(n, i, o_)| (n.as_str(), nf4_code_bytes(i * o_))).fold(("", 0), |best, x| if x.1 > best.1 { x } else { best });
    // A chunk of a packed table unpacked for the head's product (16-bit ones on the CPU; every
    // one on GPU backends).
    let head_chunk = if table_value_bytes(c) == 2 || o.device == Device::Gpu { (crate::ops::packed::CHUNK_BYTES as u64).min(v * h * 4) } else { 0 };
    let workspace_bytes = nf4_chunk
        + head_chunk
        + match o.device {
            Device::Gpu => 0,
            Device::Cpu => CPU_RUNTIME_BYTES + CPU_BYTES_PER_VOCAB_ENTRY * v,
        };
    let logits_buffer = logits_bytes / copies;
    // Frozen tables are split into parts that fit (see PackedWeight), down to one row each.
    let table_row = h * table_value_bytes(c);
    let linear_buffer = if o.nf4 { (largest_codes, format!("{largest_name}.weight's NF4 codes")) } else { (largest_linear, format!("{largest_name}.weight")) };
    let (largest_buffer_bytes, largest_buffer) = [(table_row, "a row of model.embed_tokens.weight".to_string()), (logits_buffer, "logits".to_string()), linear_buffer]
        .into_iter()
        .max_by_key(|x| x.0)
        .expect("three candidates");
    MemoryPlan {
        nf4_codes_bytes,
        nf4_stats_bytes,
        dense_bytes,
        host_table_bytes,
        base_bytes,
        lora_params,
        lora_weight_bytes,
        lora_grad_bytes,
        optimizer_bytes,
        optim: o.optim,
        lora_bytes,
        activation_bytes,
        logits_bytes,
        workspace_bytes,
        total_bytes: base_bytes + lora_bytes + activation_bytes + logits_bytes + workspace_bytes,
        largest_buffer_bytes,
        largest_buffer,
        checkpointing: o.checkpointing,
    }
}

/// Bytes as the page and CLI print them.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Layers split across the devices of one host: the device index of each decoder layer, and
/// the bytes each device is planned to hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceMap {
    pub layer_device: Vec<usize>,
    pub device_bytes: Vec<u64>,
}

/// What one device holds: a share of the layers, plus fixed parts (embeddings with the first
/// layer; the final norm, an untied lm_head and the logits with the last; with tied embeddings
/// the logits are made where the embeddings are).
struct Shares {
    layer: Vec<u64>,
    /// Per device in use: one layer's autodiff graph and the gradient flowing down (or nothing
    /// more without checkpointing, whose graphs are in `layer`), and a dequantized linear.
    per_device: u64,
    first: u64,
    last: u64,
}

fn shares(c: &Config, lora: &LoraConfig, o: &PlanOptions) -> Shares {
    let whole = plan(c, lora, &PlanOptions { device: Device::Gpu, ..*o });
    let (v, h, layers) = (c.vocab_size as u64, c.hidden_size as u64, c.num_hidden_layers.max(1) as u64);
    let tokens = (o.batch * o.seq) as u64;
    let embed = v * h * table_value_bytes(c);
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let embed_device = if embed_on_host(c, o) { 0 } else { embed };
    let lora_per_layer = whole.lora_bytes / layers;
    let weights_per_layer = (whole.base_bytes - embed_device - head - h * 4) / layers;
    // The plan's activations are the saved inputs (one per layer, one more) plus one layer's
    // graph and two gradient buffers when checkpointing, or every layer's graph without.
    let saved = if o.checkpointing { tokens * h * 4 } else { whole.activation_bytes / layers };
    let graph = if o.checkpointing { whole.activation_bytes - (layers + 1) * tokens * h * 4 } else { 0 };
    let (head_side, embed_side) = if c.tie_word_embeddings { (0, whole.logits_bytes) } else { (whole.logits_bytes, 0) };
    Shares {
        layer: vec![weights_per_layer + lora_per_layer + saved; layers as usize],
        per_device: graph + whole.workspace_bytes,
        first: embed_device + embed_side + if o.checkpointing { tokens * h * 4 } else { 0 },
        last: head + h * 4 + head_side,
    }
}

/// Fills the devices in order, each up to its capacity (bytes), as a device map with
/// per-device limits does. Errors with the shortfall when the model does not fit.
pub fn split_layers(c: &Config, lora: &LoraConfig, o: &PlanOptions, capacities: &[u64]) -> Result<DeviceMap, String> {
    fill(&shares(c, lora, o), capacities)
}

/// Splits the layers over `devices` equal devices so that the fullest holds as little as it can.
pub fn balance_layers(c: &Config, lora: &LoraConfig, o: &PlanOptions, devices: usize) -> DeviceMap {
    let s = shares(c, lora, o);
    let total: u64 = s.layer.iter().sum::<u64>() + s.first + s.last + s.per_device;
    let (mut lo, mut hi) = (0u64, total);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fill(&s, &vec![mid; devices.max(1)]).is_ok() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    fill(&s, &vec![hi; devices.max(1)]).expect("the whole model fits one device of its total size")
}

fn fill(s: &Shares, capacities: &[u64]) -> Result<DeviceMap, String> {
    let n = s.layer.len();
    let mut layer_device = Vec::with_capacity(n);
    let mut device_bytes = vec![0u64; capacities.len()];
    let mut d = 0;
    let mut load = s.first + s.per_device;
    for (i, &bytes) in s.layer.iter().enumerate() {
        let tail = if i + 1 == n { s.last } else { 0 };
        while load + bytes + tail > capacities.get(d).copied().unwrap_or(0) {
            if d + 1 >= capacities.len() {
                let need: u64 = s.layer[i..].iter().sum::<u64>() + s.last;
                let free = capacities.get(d).copied().unwrap_or(0).saturating_sub(load);
                return Err(format!(
                    "the model does not fit {} device(s): layers {i}..{n} and the head need {}, {} is left on the last ({} short)",
                    capacities.len(),
                    human(need),
                    human(free),
                    human(need.saturating_sub(free))
                ));
            }
            device_bytes[d] = load;
            d += 1;
            load = s.per_device;
        }
        load += bytes;
        layer_device.push(d);
    }
    load += s.last;
    device_bytes[d] = load;
    device_bytes.truncate(d + 1);
    Ok(DeviceMap { layer_device, device_bytes })
}
