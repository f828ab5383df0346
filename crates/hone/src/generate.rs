//! Text generation with a KV cache, several prompts at once: greedy, or sampling with temperature, top-k and top-p;
//! repetition penalty as transformers applies it; stops on the model's end tokens.

use crate::model::decoder::KvCache;
use crate::model::CausalLm;
use crate::ops::HoneBackend;
use burn::tensor::{Tensor, TensorData};
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

/// One prompt's state while generating.
struct Row {
    rng: rand_chacha::ChaCha8Rng,
    /// Every token so far (the repetition penalty's context).
    context: Vec<u32>,
    out: Vec<u32>,
    done: bool,
}

/// Generation for several prompts at once, one token per prompt per step, split where the
/// logits are read back, so that the native loop reads synchronously and the browser's awaits
/// the read. Prompts are left-padded to one length (as transformers batches them; padding is
/// masked and positions start at each prompt's first token), and a prompt that finishes leaves
/// the batch and the cache. Each prompt has its own random stream seeded by `cfg.seed`, so a
/// prompt gets the tokens it would get alone.
pub struct Generator<'a, B: HoneBackend> {
    model: &'a CausalLm<B>,
    cfg: &'a GenerateConfig,
    cache: KvCache<B>,
    rows: Vec<Row>,
    /// The rows still generating, in the cache's order.
    active: Vec<usize>,
    /// The next forward's tokens, `[active, t]` row-major.
    next: Vec<u32>,
    /// The adapters stay as they are while generating: DoRA's norms are computed once.
    _fixed: crate::lora::linear::FixedAdapters,
}

impl<'a, B: HoneBackend> Generator<'a, B> {
    pub fn new(model: &'a CausalLm<B>, prompts: &[Vec<u32>], cfg: &'a GenerateConfig) -> Self {
        let rows: Vec<Row> = prompts
            .iter()
            .map(|p| Row { rng: rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed), context: p.clone(), out: Vec::new(), done: cfg.max_new_tokens == 0 || p.is_empty() })
            .collect();
        let active: Vec<usize> = (0..rows.len()).filter(|&i| !rows[i].done).collect();
        let longest = active.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
        let mut next = Vec::with_capacity(active.len() * longest);
        let mut pads = Vec::with_capacity(active.len());
        for &i in &active {
            let pad = longest - prompts[i].len();
            // Token 0 stands in for padding: it is masked, its value never matters.
            next.extend(std::iter::repeat(0).take(pad).chain(prompts[i].iter().copied()));
            pads.push(pad);
        }
        Generator {
            model,
            cfg,
            cache: KvCache::padded(model.model.layers.len(), pads),
            rows,
            active,
            next,
            _fixed: crate::lora::linear::FixedAdapters::begin(),
        }
    }

    /// True when every prompt has finished.
    pub fn done(&self) -> bool {
        self.active.is_empty()
    }

    /// Runs the model on the tokens not yet seen; returns each active row's last logits
    /// `[active, vocab]`, on the device.
    pub fn forward(&mut self) -> Tensor<B, 2> {
        let b = self.active.len();
        let t = self.next.len() / b;
        let ids: Vec<i64> = self.next.iter().map(|&i| i as i64).collect();
        self.model.forward_cached_last(&TensorData::new(ids, [b, t]), &mut self.cache)
    }

    /// Picks each active row's next token from the logits `forward` gave, read back.
    pub fn accept(&mut self, mut logits: Vec<f32>) {
        let v = logits.len() / self.active.len();
        self.next.clear();
        let mut keep = Vec::with_capacity(self.active.len());
        for (k, (&i, l)) in self.active.iter().zip(logits.chunks_mut(v)).enumerate() {
            let row = &mut self.rows[i];
            let token = pick(l, &row.context, self.cfg, &mut row.rng);
            row.out.push(token);
            row.context.push(token);
            row.done = self.cfg.stop_ids.contains(&token) || row.out.len() >= self.cfg.max_new_tokens;
            if !row.done {
                keep.push(k);
                self.next.push(token);
            }
        }
        if keep.len() < self.active.len() {
            if !keep.is_empty() {
                self.cache.keep_rows(&keep);
            }
            self.active = keep.iter().map(|&k| self.active[k]).collect();
        }
    }

    /// New tokens per prompt, in the prompts' order.
    pub fn outputs(self) -> Vec<Vec<u32>> {
        self.rows.into_iter().map(|r| r.out).collect()
    }

    /// Tokens generated so far, all prompts together.
    pub fn generated(&self) -> usize {
        self.rows.iter().map(|r| r.out.len()).sum()
    }
}

/// New tokens after `prompt` (native: one synchronous read of the last logits per token).
#[cfg(not(target_arch = "wasm32"))]
pub fn generate<B: HoneBackend>(model: &CausalLm<B>, prompt: &[u32], cfg: &GenerateConfig) -> Vec<u32> {
    generate_batch(model, &[prompt.to_vec()], cfg, 1).remove(0)
}

/// New tokens after each prompt, `batch` prompts at a time (prompts of similar lengths batched
/// together, so that little is padding); outputs in the prompts' order.
#[cfg(not(target_arch = "wasm32"))]
pub fn generate_batch<B: HoneBackend>(model: &CausalLm<B>, prompts: &[Vec<u32>], cfg: &GenerateConfig, batch: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    for group in batches(prompts, batch) {
        let chunk: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
        let mut g = Generator::new(model, &chunk, cfg);
        while !g.done() {
            let logits = g.forward().into_data().to_vec::<f32>().expect("f32");
            g.accept(logits);
        }
        for (&i, o) in group.iter().zip(g.outputs()) {
            out[i] = o;
        }
    }
    out
}

/// New tokens after `prompt`, reading each token's logits asynchronously (the browser's way).
pub async fn generate_async<B: HoneBackend>(model: &CausalLm<B>, prompt: &[u32], cfg: &GenerateConfig) -> crate::Result<Vec<u32>> {
    Ok(generate_batch_async(model, &[prompt.to_vec()], cfg, 1).await?.remove(0))
}

/// [`generate_batch`], reading the logits asynchronously.
pub async fn generate_batch_async<B: HoneBackend>(model: &CausalLm<B>, prompts: &[Vec<u32>], cfg: &GenerateConfig, batch: usize) -> crate::Result<Vec<Vec<u32>>> {
    let mut out = vec![Vec::new(); prompts.len()];
    for group in batches(prompts, batch) {
        let chunk: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
        let mut g = Generator::new(model, &chunk, cfg);
        while !g.done() {
            let logits = crate::readback::read_f32(g.forward()).await?;
            g.accept(logits);
        }
        for (&i, o) in group.iter().zip(g.outputs()) {
            out[i] = o;
        }
    }
    Ok(out)
}

/// The prompts' indices in groups of at most `batch`, shortest prompts first.
fn batches(prompts: &[Vec<u32>], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    order.chunks(batch.max(1)).map(|c| c.to_vec()).collect()
}
