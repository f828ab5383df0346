//! Text generation with a KV cache: greedy, or sampling with temperature, top-k and top-p;
//! repetition penalty as transformers applies it; stops on the model's end tokens.

use crate::model::decoder::KvCache;
use crate::model::CausalLm;
use crate::ops::HoneBackend;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::rand_core::{RngCore, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 means none.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Generation stops after producing any of these.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig { max_new_tokens: 128, temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: 0, stop_ids: Vec::new() }
    }
}

/// Picks the next token from one row of logits; `context` is every token so far.
pub fn pick(logits: &mut [f32], context: &[u32], cfg: &GenerateConfig, rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut seen = context.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = cfg.temperature as f32;
    let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = cfg.top_k.filter(|&k| k > 0) {
        candidates.truncate(k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = cfg.top_p.filter(|&p| p < 1.0) {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= top_p
        });
        let n = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(n);
        candidates.truncate(n);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (c, p) in candidates.iter().zip(&probs) {
        acc += p;
        if u < acc {
            return c.0;
        }
    }
    candidates.last().map_or(0, |c| c.0)
}

/// Generation one token at a time, split where the logits are read back, so that the native
/// loop reads synchronously and the browser's awaits the read.
pub struct Generator<'a, B: HoneBackend> {
    model: &'a CausalLm<B>,
    cfg: &'a GenerateConfig,
    device: B::Device,
    cache: KvCache<B>,
    rng: rand_chacha::ChaCha8Rng,
    context: Vec<u32>,
    next: Vec<u32>,
    pub out: Vec<u32>,
    done: bool,
    /// The adapters stay as they are while generating: DoRA's norms are computed once.
    _fixed: crate::lora::linear::FixedAdapters,
}

impl<'a, B: HoneBackend> Generator<'a, B> {
    pub fn new(model: &'a CausalLm<B>, prompt: &[u32], cfg: &'a GenerateConfig, device: &B::Device) -> Self {
        Generator {
            model,
            cfg,
            device: device.clone(),
            cache: KvCache::new(model.model.layers.len()),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
            context: prompt.to_vec(),
            next: prompt.to_vec(),
            out: Vec::new(),
            done: cfg.max_new_tokens == 0 || prompt.is_empty(),
            _fixed: crate::lora::linear::FixedAdapters::begin(),
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Runs the model on the tokens not yet seen; returns the last position's logits, on the device.
    pub fn forward(&mut self) -> Tensor<B, 1> {
        let ids: Vec<i64> = self.next.iter().map(|&i| i as i64).collect();
        let t = ids.len();
        let logits = self.model.forward_cached(Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, t]), &self.device), &mut self.cache);
        let v = logits.dims()[2];
        logits.narrow(1, t - 1, 1).reshape([v])
    }

    /// Picks the next token from the logits `forward` gave, read back; returns it.
    pub fn accept(&mut self, mut logits: Vec<f32>) -> u32 {
        let token = pick(&mut logits, &self.context, self.cfg, &mut self.rng);
        self.out.push(token);
        self.context.push(token);
        self.next = vec![token];
        self.done = self.cfg.stop_ids.contains(&token) || self.out.len() >= self.cfg.max_new_tokens;
        token
    }
}

/// New tokens after `prompt` (native: one synchronous read of the last logits per token).
#[cfg(not(target_arch = "wasm32"))]
pub fn generate<B: HoneBackend>(model: &CausalLm<B>, prompt: &[u32], cfg: &GenerateConfig, device: &B::Device) -> Vec<u32> {
    let mut g = Generator::new(model, prompt, cfg, device);
    while !g.done() {
        let logits = g.forward().into_data().to_vec::<f32>().expect("f32");
        g.accept(logits);
    }
    g.out
}

/// New tokens after `prompt`, reading each token's logits asynchronously (the browser's way).
pub async fn generate_async<B: HoneBackend>(model: &CausalLm<B>, prompt: &[u32], cfg: &GenerateConfig, device: &B::Device) -> crate::Result<Vec<u32>> {
    let mut g = Generator::new(model, prompt, cfg, device);
    while !g.done() {
        let logits = crate::readback::read_f32(g.forward()).await?;
        g.accept(logits);
    }
    Ok(g.out)
}
