//! One decoder for every supported architecture. Module and field names are Hugging Face's, so
//! a weight `model.layers.3.self_attn.q_proj.weight` lives at `model.layers[3].self_attn.q_proj`.

use super::config::Config;
use crate::lora::LoraLinear;
use crate::ops::AttentionShape;
use crate::ops::HoneBackend;
use crate::quant::FrozenWeight;
use super::rope;
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: crate::ops::HoneBackend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        B::rms_norm(x.reshape([b * t, d]), self.weight.clone(), self.eps).0.reshape([b, t, d])
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Separate projections (Llama, Mistral, Qwen2) ...
    pub q_proj: Option<LoraLinear<B>>,
    pub k_proj: Option<LoraLinear<B>>,
    pub v_proj: Option<LoraLinear<B>>,
    /// ... or Phi-3's fused one, rows ordered q, k, v.
    pub qkv_proj: Option<LoraLinear<B>>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Per-forward inputs shared by all layers: RoPE tables `[1, 1, T, rot]` and the additive mask
/// `[1, 1, T, T]`.
pub struct Positions<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    pub mask: Tensor<B, 4>,
}

impl<B: Backend> Positions<B> {
    pub fn new(cfg: &Config, seq_len: usize, device: &B::Device) -> Self {
        Self::with_past(cfg, 0, seq_len, device)
    }

    /// For `seq_len` new tokens after `past` cached ones: RoPE at positions `past..past+seq_len`,
    /// and a `[seq_len, past + seq_len]` causal mask.
    pub fn with_past(cfg: &Config, past: usize, seq_len: usize, device: &B::Device) -> Self {
        let rot = cfg.rotary_dim();
        let total = past + seq_len;
        let (cos, sin) = rope::cos_sin(cfg, total);
        let rows = |v: Vec<f32>| v[past * rot..].to_vec();
        let table = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [seq_len, rot]), device).unsqueeze_dims::<4>(&[0, 1]);
        let mut mask = vec![0f32; seq_len * total];
        for i in 0..seq_len {
            let qi = past + i;
            for j in 0..total {
                let outside_window = cfg.sliding_window.is_some_and(|w| j <= qi && qi - j >= w);
                if j > qi || outside_window {
                    mask[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [seq_len, total]), device).unsqueeze_dims::<4>(&[0, 1]);
        Positions { cos: table(rows(cos)), sin: table(rows(sin)), mask }
    }

    /// [`Self::with_past`] for rows left-padded by `pads[r]` tokens (batched generation): row r's
    /// token at cache index `i` has position `i - pads[r]`, and no real token attends to padding.
    /// A padding token attends to itself alone, so that its keys stay finite. Tables and mask
    /// are per row, `[B, 1, seq_len, ·]`.
    pub fn with_past_padded(cfg: &Config, pads: &[usize], past: usize, seq_len: usize, device: &B::Device) -> Self {
        let rot = cfg.rotary_dim();
        let (b, total) = (pads.len(), past + seq_len);
        let (mut cos_rows, mut sin_rows) = (Vec::with_capacity(b * seq_len * rot), Vec::with_capacity(b * seq_len * rot));
        let mut mask = vec![f32::NEG_INFINITY; b * seq_len * total];
        for (r, &pad) in pads.iter().enumerate() {
            // LongRoPE picks its factors by the row's own length, as one-row generation does.
            let first = past.max(pad);
            let (cos, sin) = rope::cos_sin_range(cfg, total - pad, first - pad..total - pad);
            for i in past..total {
                if i < pad {
                    cos_rows.extend(std::iter::repeat(1.0).take(rot));
                    sin_rows.extend(std::iter::repeat(0.0).take(rot));
                } else {
                    let at = (i - first) * rot;
                    cos_rows.extend_from_slice(&cos[at..at + rot]);
                    sin_rows.extend_from_slice(&sin[at..at + rot]);
                }
                let row = &mut mask[(r * seq_len + i - past) * total..][..total];
                if i < pad {
                    row[i] = 0.0;
                    continue;
                }
                for j in pad..=i {
                    if !cfg.sliding_window.is_some_and(|w| i - j >= w) {
                        row[j] = 0.0;
                    }
                }
            }
        }
        let table = |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [b, seq_len, rot]), device).unsqueeze_dim::<4>(1);
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [b, seq_len, total]), device).unsqueeze_dim::<4>(1);
        Positions { cos: table(cos_rows), sin: table(sin_rows), mask }
    }

    /// For rows of `t` tokens, each made of samples (packing) of the given lengths: positions
    /// restart at every sample and no token attends across samples. Tokens past a row's samples
    /// (padding) form one more sample of their own. Tables and mask are per row, `[B, 1, T, ·]`.
    pub fn packed(cfg: &Config, rows: &[Vec<usize>], t: usize, device: &B::Device) -> Self {
        let rot = cfg.rotary_dim();
        let b = rows.len();
        let mut segments: Vec<Vec<usize>> = rows.to_vec();
        for seg in &mut segments {
            let used: usize = seg.iter().sum();
            assert!(used <= t, "packed samples ({used} tokens) longer than the row ({t})");
            if used < t {
                seg.push(t - used);
            }
        }
        // LongRoPE picks its factors by the longest position in use, as transformers does.
        let longest = segments.iter().flatten().copied().max().unwrap_or(1);
        let (cos, sin) = rope::cos_sin(cfg, longest);
        let (mut cos_rows, mut sin_rows) = (Vec::with_capacity(b * t * rot), Vec::with_capacity(b * t * rot));
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (r, seg) in segments.iter().enumerate() {
            let mut start = 0;
            for &len in seg {
                cos_rows.extend_from_slice(&cos[..len * rot]);
                sin_rows.extend_from_slice(&sin[..len * rot]);
                for i in 0..len {
                    for j in 0..=i {
                        let outside_window = cfg.sliding_window.is_some_and(|w| i - j >= w);
                        if !outside_window {
                            mask[r * t * t + (start + i) * t + start + j] = 0.0;
                        }
                    }
                }
                start += len;
            }
        }
        let table = |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [b, t, rot]), device).unsqueeze_dim::<4>(1);
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [b, t, t]), device).unsqueeze_dim::<4>(1);
        Positions { cos: table(cos_rows), sin: table(sin_rows), mask }
    }

    /// The same tables on another backend of the same device (the autodiff one and its inner).
    pub fn to_backend<O: Backend>(&self, f: impl Fn(Tensor<B, 4>) -> Tensor<O, 4>) -> Positions<O> {
        Positions { cos: f(self.cos.clone()), sin: f(self.sin.clone()), mask: f(self.mask.clone()) }
    }
}

impl<B: HoneBackend> Positions<B> {
    /// The same tables on another device.
    pub fn to_device(&self, device: &B::Device) -> Self {
        Positions { cos: onto(self.cos.clone(), device), sin: onto(self.sin.clone(), device), mask: onto(self.mask.clone(), device) }
    }
}

/// `x` on `device`, untouched (no copy, no autodiff node) when already there.
pub fn onto<B: HoneBackend, const D: usize>(x: Tensor<B, D>, device: &B::Device) -> Tensor<B, D> {
    if &x.device() == device {
        x
    } else {
        B::move_to(x, device)
    }
}

/// One forward's positions for layers placed on several devices: moved to each device once.
pub struct PositionsOn<'a, B: HoneBackend> {
    home: &'a Positions<B>,
    moved: Vec<(B::Device, Positions<B>)>,
}

impl<'a, B: HoneBackend> PositionsOn<'a, B> {
    pub fn new(home: &'a Positions<B>) -> Self {
        PositionsOn { home, moved: Vec::new() }
    }

    pub fn on(&mut self, device: &B::Device) -> &Positions<B> {
        if &self.home.mask.device() == device {
            return self.home;
        }
        let at = match self.moved.iter().position(|(d, _)| d == device) {
            Some(at) => at,
            None => {
                self.moved.push((device.clone(), self.home.to_device(device)));
                self.moved.len() - 1
            }
        };
        &self.moved[at].1
    }
}

/// Keys and values of the tokens seen so far, per layer (`[B, kv_heads, T, head_dim]`, after
/// RoPE), so that generation computes each new token once.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    pub len: usize,
    /// Left padding of each row (batched generation); empty when no row is padded.
    pub pads: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![None; layers], len: 0, pads: Vec::new() }
    }

    /// For rows left-padded by `pads` tokens.
    pub fn padded(layers: usize, pads: Vec<usize>) -> Self {
        let pads = if pads.iter().all(|&p| p == 0) { Vec::new() } else { pads };
        KvCache { layers: vec![None; layers], len: 0, pads }
    }

    /// Keeps only the given rows (in this order), dropping the others' keys and values.
    pub fn keep_rows(&mut self, rows: &[usize]) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]), &k.device());
            *k = k.clone().select(0, index.clone());
            *v = v.clone().select(0, index);
        }
        if !self.pads.is_empty() {
            self.pads = rows.iter().map(|&r| self.pads[r]).collect();
        }
    }
}

/// transformers' `rotate_half` RoPE on the first `rot` dims of `x: [B, H, T, D]`.
fn apply_rope<B: Backend>(x: Tensor<B, 4>, pos: &Positions<B>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let rot = pos.cos.dims()[3];
    let x_rot = x.clone().narrow(3, 0, rot);
    let half = rot / 2;
    let x1 = x_rot.clone().narrow(3, 0, half);
    let x2 = x_rot.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let out = x_rot * pos.cos.clone() + rotated * pos.sin.clone();
    if rot == d {
        out
    } else {
        Tensor::cat(vec![out, x.narrow(3, rot, d - rot)], 3)
    }
}

impl<B: HoneBackend> Attention<B> {
    pub fn forward(&self, x: Tensor<B, 3>, pos: &Positions<B>) -> Tensor<B, 3> {
        self.forward_cached(x, pos, None)
    }

    pub fn forward_cached(&self, x: Tensor<B, 3>, pos: &Positions<B>, cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv_proj {
            Some(qkv) => {
                let qkv = qkv.forward(x);
                (qkv.clone().narrow(2, 0, nh * hd), qkv.clone().narrow(2, nh * hd, nkv * hd), qkv.narrow(2, (nh + nkv) * hd, nkv * hd))
            }
            None => {
                let proj = |p: &Option<LoraLinear<B>>| p.as_ref().expect("separate q/k/v projections").forward(x.clone());
                (proj(&self.q_proj), proj(&self.k_proj), proj(&self.v_proj))
            }
        };
        if cache.is_none() {
            let shape = AttentionShape { batch: b, seq: t, heads: nh, kv_heads: nkv, head_dim: hd };
            let flat = |y: &Tensor<B, 3>, n: usize| y.clone().reshape([b * t, n * hd]);
            if let Some((out, _)) = B::self_attention(flat(&q, nh), flat(&k, nkv), flat(&v, nkv), [pos.cos.clone(), pos.sin.clone()], pos.mask.clone(), shape) {
                return self.o_proj.forward(out.reshape([b, t, nh * hd]));
            }
        }
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(heads(q, nh), pos);
        let mut k = apply_rope(heads(k, nkv), pos);
        let mut v = heads(v, nkv);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention without copying K and V per query head: the query heads that
        // share a K/V head are stacked as rows of one product (heads are grouped contiguously).
        let total = k.dims()[2];
        let rep = nh / nkv;
        let q = q.reshape([b, nkv, rep * t, hd]);
        let scores = B::matmul(q, k.swap_dims(2, 3)).mul_scalar((hd as f64).powf(-0.5)).reshape([b, nh, t, total]) + pos.mask.clone();
        let probs = softmax(scores, 3).reshape([b, nkv, rep * t, total]);
        let out = B::matmul(probs, v).reshape([b, nh, t, hd]);
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, t, nh * hd]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<LoraLinear<B>>,
    pub up_proj: Option<LoraLinear<B>>,
    /// Phi-3's fused projection: gate rows first, then up.
    pub gate_up_proj: Option<LoraLinear<B>>,
    pub down_proj: LoraLinear<B>,
}

impl<B: HoneBackend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match &self.gate_up_proj {
            Some(gu) => {
                let y = gu.forward(x);
                let half = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, half), y.narrow(2, half, half))
            }
            None => (
                self.gate_proj.as_ref().expect("gate_proj").forward(x.clone()),
                self.up_proj.as_ref().expect("up_proj").forward(x),
            ),
        };
        let [b, t, f] = gate.dims();
        self.down_proj.forward(B::swiglu(gate.reshape([b * t, f]), up.reshape([b * t, f])).reshape([b, t, f]))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: HoneBackend> DecoderLayer<B> {
    /// The device holding this layer's weights (layers may be split across devices).
    pub fn device(&self) -> B::Device {
        self.input_layernorm.weight.device()
    }

    pub fn forward(&self, x: Tensor<B, 3>, pos: &Positions<B>) -> Tensor<B, 3> {
        self.forward_cached(x, pos, None)
    }

    pub fn forward_cached(&self, x: Tensor<B, 3>, pos: &Positions<B>, cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward_cached(self.input_layernorm.forward(x), pos, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Hugging Face's `model.` prefix.
#[derive(Module, Debug)]
pub struct Body<B: Backend> {
    /// Frozen, in the checkpoint's precision (see [`FrozenWeight`]).
    pub embed_tokens: FrozenWeight<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Body<B>,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<LoraLinear<B>>,
    #[module(skip)]
    pub config: Config,
}

impl<B: HoneBackend> CausalLm<B> {
    /// Final hidden states `[B, T, hidden]` for token ids `[B, T]` (host data, i64).
    pub fn hidden(&self, ids: &TensorData) -> Tensor<B, 3> {
        let pos = Positions::new(&self.config, ids.shape[1], &self.model.embed_tokens.device());
        self.hidden_at(ids, &pos)
    }

    /// [`Self::hidden`] with given positions and mask (packed rows).
    pub fn hidden_at(&self, ids: &TensorData, pos: &Positions<B>) -> Tensor<B, 3> {
        let mut x = self.embed(ids);
        let mut pos = PositionsOn::new(pos);
        for layer in &self.model.layers {
            let device = layer.device();
            x = layer.forward(onto(x, &device), pos.on(&device));
        }
        self.final_norm(x)
    }

    /// The final norm, on its own device.
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.model.norm.forward(onto(x, &self.model.norm.weight.device()))
    }

    /// The embeddings of token ids `[B, T]` (host data, i64): ids stay on the host because a
    /// table kept in host memory ([`HoneBackend::tables_on_host`]) reads its rows there, and
    /// reading ids back from a device would block (which wasm cannot).
    pub fn embed(&self, ids: &TensorData) -> Tensor<B, 3> {
        let (table, device) = (&self.model.embed_tokens, self.model.embed_tokens.device());
        let ([b, t], h) = ([ids.shape[0], ids.shape[1]], table.dims()[1]);
        if let Some(p) = table.packed.as_ref().filter(|p| p.host.is_some()) {
            return crate::ops::packed::host_rows(p, &ids.iter::<i64>().collect::<Vec<_>>()).reshape([b, t, h]);
        }
        B::frozen_rows(table, Tensor::<B, 2, Int>::from_data(ids.clone(), &device).reshape([b * t])).reshape([b, t, h])
    }

    /// Logits `[B, T, vocab]`.
    pub fn forward(&self, ids: &TensorData) -> Tensor<B, 3> {
        let h = self.hidden(ids);
        self.head(h)
    }

    /// Logits with given positions and mask (packed rows).
    pub fn forward_at(&self, ids: &TensorData, pos: &Positions<B>) -> Tensor<B, 3> {
        let h = self.hidden_at(ids, pos);
        self.head(h)
    }

    /// Logits for new tokens `ids` after those in `cache`, which is extended with them.
    pub fn forward_cached(&self, ids: &TensorData, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let h = self.hidden_cached(ids, cache);
        self.head(h)
    }

    /// [`Self::forward_cached`]'s logits at the last new position alone, `[B, vocab]`: the head
    /// runs on one token per row, however long the prompt.
    pub fn forward_cached_last(&self, ids: &TensorData, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let h = self.hidden_cached(ids, cache);
        let [b, t, _] = h.dims();
        let logits = self.head(h.narrow(1, t - 1, 1));
        let v = logits.dims()[2];
        logits.reshape([b, v])
    }

    /// Final (normed) hidden states of new tokens `ids` after those in `cache`, which is extended.
    fn hidden_cached(&self, ids: &TensorData, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let (t, device) = (ids.shape[1], self.model.embed_tokens.device());
        let pos = if cache.pads.is_empty() {
            Positions::with_past(&self.config, cache.len, t, &device)
        } else {
            Positions::with_past_padded(&self.config, &cache.pads, cache.len, t, &device)
        };
        let mut x = self.embed(ids);
        let mut pos = PositionsOn::new(&pos);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            let device = layer.device();
            x = layer.forward_cached(onto(x, &device), pos.on(&device), Some(slot));
        }
        cache.len += t;
        self.final_norm(x)
    }

    /// Logits from final (normed) hidden states, computed on the head's device.
    pub fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = onto(h, &self.head_device());
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                // Tied: the frozen embedding is the head's weight, used as any frozen linear's.
                let [b, t, d] = h.dims();
                let v = self.model.embed_tokens.dims()[0];
                B::frozen_matmul(h.reshape([b * t, d]), &self.model.embed_tokens).reshape([b, t, v])
            }
        }
    }

    /// Where the logits are computed: lm_head's device, or the embeddings' when tied.
    pub fn head_device(&self) -> B::Device {
        match &self.lm_head {
            Some(head) => head.weight.device(),
            None => self.model.embed_tokens.device(),
        }
    }

    /// Every device the model's weights are on, each once, embeddings' first.
    pub fn devices(&self) -> Vec<B::Device> {
        let mut out = vec![self.model.embed_tokens.device()];
        for d in self.model.layers.iter().map(|l| l.device()).chain([self.model.norm.weight.device(), self.head_device()]) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// Every linear layer with its Hugging Face module name (`model.layers.0.self_attn.q_proj`,
    /// ..., `lm_head`), in a fixed order.
    pub fn linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let m = &layer.mlp;
            let named = [
                ("self_attn.q_proj", a.q_proj.as_ref()),
                ("self_attn.k_proj", a.k_proj.as_ref()),
                ("self_attn.v_proj", a.v_proj.as_ref()),
                ("self_attn.qkv_proj", a.qkv_proj.as_ref()),
                ("self_attn.o_proj", Some(&a.o_proj)),
                ("mlp.gate_proj", m.gate_proj.as_ref()),
                ("mlp.up_proj", m.up_proj.as_ref()),
                ("mlp.gate_up_proj", m.gate_up_proj.as_ref()),
                ("mlp.down_proj", Some(&m.down_proj)),
            ];
            for (name, lin) in named {
                if let Some(lin) = lin {
                    out.push((format!("model.layers.{i}.{name}"), lin));
                }
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// As [`Self::linears`], mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            let named = [
                ("self_attn.q_proj", a.q_proj.as_mut()),
                ("self_attn.k_proj", a.k_proj.as_mut()),
                ("self_attn.v_proj", a.v_proj.as_mut()),
                ("self_attn.qkv_proj", a.qkv_proj.as_mut()),
                ("self_attn.o_proj", Some(&mut a.o_proj)),
                ("mlp.gate_proj", m.gate_proj.as_mut()),
                ("mlp.up_proj", m.up_proj.as_mut()),
                ("mlp.gate_up_proj", m.gate_up_proj.as_mut()),
                ("mlp.down_proj", Some(&mut m.down_proj)),
            ];
            for (name, lin) in named {
                if let Some(lin) = lin {
                    out.push((format!("model.layers.{i}.{name}"), lin));
                }
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Logits `[T, vocab]` for one sequence of ids.
    pub fn logits(&self, ids: &[u32]) -> Tensor<B, 2> {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let t = ids.len();
        self.forward(&TensorData::new(ids, [1, t])).squeeze_dim(0)
    }
}
