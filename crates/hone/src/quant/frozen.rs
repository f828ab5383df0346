//! Frozen base weights on the device, as compactly as the checkpoint allows: NF4 decoder linears
//! at 4 bits per weight with bitsandbytes' double-quantized absmax kept in its 8-bit form, and
//! every other frozen tensor (embeddings, an untied lm_head) in the checkpoint's own precision,
//! 16-bit pairs packed in i32 words. Integer words because WGSL has no 8- or 16-bit storage
//! without extensions: one layout serves the CPU, WebGPU, Vulkan/Metal and CUDA. The ops that
//! read them (matmuls that decode inside the product, row lookups) live in `crate::ops`.

use super::dynamic_map::signed_dynamic_map;
use super::nf4::{Absmax, Nf4Tensor, NESTED_BLOCKSIZE, NF4_CODE};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

/// An integer tensor of i32 words on `device`, kept as i32 on every backend (the CPU backend's
/// integers default to i64, which would double the room).
pub fn words_tensor<B: Backend>(words: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = words.len();
    Tensor::from_data(TensorData::new(words, [n]), (device, DType::I32))
}

/// Bytes as little-endian i32 words, zero-padded to a whole word.
pub fn bytes_to_words(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks(4).map(|c| i32::from_le_bytes(std::array::from_fn(|k| c.get(k).copied().unwrap_or(0)))).collect()
}

/// NF4 codes on the device: 8 codes per i32 word, the packed bytes in bitsandbytes' order
/// (little-endian within the word: value `2j` in the high nibble of byte `j`), and the absmax
/// of each block either as f32 (`absmax`) or, double-quantized, as bitsandbytes keeps it: one
/// 8-bit code per block (4 per word, `absmax_codes`) into the signed dynamic map, scaled by
/// `nested[block / 256]`, plus `nested`'s last value, the offset. Kernels expand it where they
/// use it, in bitsandbytes' order of operations (`code·scale`, then `+ offset`, in f32), so
/// dequantizing equals bitsandbytes bit for bit on every device.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    pub words: Tensor<B, 1, Int>,
    pub absmax: Option<Tensor<B, 1>>,
    pub absmax_codes: Option<Tensor<B, 1, Int>>,
    /// One f32 per 256 blocks, then the offset.
    pub nested: Option<Tensor<B, 1>>,
    pub out_features: usize,
    pub in_features: usize,
    pub blocksize: usize,
}

impl<B: Backend> Nf4Weight<B> {
    pub fn from_host(q: &Nf4Tensor, device: &B::Device) -> Self {
        let [out_features, in_features] = match q.shape.as_slice() {
            [o, i] => [*o, *i],
            other => panic!("NF4 weight must be 2-D, got {other:?}"),
        };
        let words = words_tensor::<B>(bytes_to_words(&q.packed), device);
        let f32s = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device)
        };
        let (absmax, absmax_codes, nested) = match &q.absmax {
            Absmax::Plain(a) => (Some(f32s(a.clone())), None, None),
            Absmax::Nested(n) => {
                let mut scales = n.nested_absmax.clone();
                scales.push(n.offset);
                (None, Some(words_tensor::<B>(bytes_to_words(&n.codes), device)), Some(f32s(scales)))
            }
        };
        Nf4Weight { words, absmax, absmax_codes, nested, out_features, in_features, blocksize: q.blocksize }
    }

    /// Number of absmax blocks.
    pub fn blocks(&self) -> usize {
        (self.out_features * self.in_features).div_ceil(self.blocksize)
    }

    /// The absmax of every block as f32, with tensor ops (bitsandbytes' expansion of the
    /// double-quantized form: `dynamic_map[code] · nested[block / 256] + offset`).
    pub fn absmax_f32(&self) -> Tensor<B, 1> {
        if let Some(a) = &self.absmax {
            return a.clone();
        }
        let (codes, nested) = (self.absmax_codes.as_ref().expect("plain or nested absmax"), self.nested.as_ref().expect("nested scales"));
        let device = codes.device();
        let blocks = self.blocks();
        let n_words = codes.dims()[0];
        let bytes: Vec<Tensor<B, 2, Int>> = (0..4).map(|k| codes.clone().bitwise_right_shift_scalar(((8 * k) as i32).elem()).bitwise_and_scalar(255i32.elem()).unsqueeze_dim(1)).collect();
        let codes = Tensor::cat(bytes, 1).reshape([n_words * 4]).narrow(0, 0, blocks);
        let table = Tensor::<B, 1>::from_data(TensorData::new(signed_dynamic_map().to_vec(), [256]), &device);
        let n_scales = nested.dims()[0] - 1;
        let scales = nested.clone().narrow(0, 0, n_scales).unsqueeze_dim::<2>(1).repeat_dim(1, NESTED_BLOCKSIZE).reshape([n_scales * NESTED_BLOCKSIZE]).narrow(0, 0, blocks);
        let offset = nested.clone().narrow(0, n_scales, 1);
        table.select(0, codes) * scales + offset
    }

    /// The dense `[out, in]` weight, `code[q] * absmax[block]`, with tensor ops only, so it runs
    /// on every backend (CPU, Vulkan/Metal, WebGPU, CUDA).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let device = self.words.device();
        let n = self.out_features * self.in_features;
        let n_words = self.words.dims()[0];
        // Element 2j sits in the high nibble of byte j; byte b of a word is bits 8b..8b+8.
        let nibbles: Vec<Tensor<B, 2, Int>> = (0..8)
            .map(|k| {
                let shift = 8 * (k / 2) + if k % 2 == 0 { 4 } else { 0 };
                self.words.clone().bitwise_right_shift_scalar((shift as i32).elem()).bitwise_and_scalar(15i32.elem()).unsqueeze_dim(1)
            })
            .collect();
        let codes = Tensor::cat(nibbles, 1).reshape([n_words * 8]);
        let table = Tensor::<B, 1>::from_data(TensorData::new(NF4_CODE.to_vec(), [16]), &device);
        let values = table.select(0, codes);
        let n_blocks = self.blocks();
        let padded = n_blocks * self.blocksize;
        let values = if n_words * 8 >= padded {
            values.narrow(0, 0, padded)
        } else {
            Tensor::cat(vec![values, Tensor::zeros([padded - n_words * 8], &device)], 0)
        };
        let w = values.reshape([n_blocks, self.blocksize]) * self.absmax_f32().unsqueeze_dim(1);
        w.reshape([padded]).narrow(0, 0, n).reshape([self.out_features, self.in_features])
    }

    /// Device bytes of the codes and statistics.
    pub fn bytes(&self) -> u64 {
        let len = |t: &Option<Tensor<B, 1>>| t.as_ref().map_or(0, |t| t.dims()[0]);
        4 * (self.words.dims()[0] + len(&self.absmax) + self.absmax_codes.as_ref().map_or(0, |t| t.dims()[0]) + len(&self.nested)) as u64
    }
}

/// How a packed frozen tensor's values are stored: as the checkpoint stored them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoredFloat {
    #[default]
    F32,
    BF16,
    F16,
}

impl StoredFloat {
    /// Values per i32 word.
    pub fn per_word(self) -> usize {
        match self {
            StoredFloat::F32 => 1,
            StoredFloat::BF16 | StoredFloat::F16 => 2,
        }
    }

    /// The f32 value of one stored value's bits (the low 16 bits for the 16-bit formats).
    pub fn decode(self, bits: u32) -> f32 {
        match self {
            StoredFloat::F32 => f32::from_bits(bits),
            StoredFloat::BF16 => f32::from_bits(bits << 16),
            StoredFloat::F16 => half::f16::from_bits(bits as u16).to_f32(),
        }
    }

    /// The f32 values of stored words, `per_word` values each (`out.len() == per_word * words.len()`).
    pub fn decode_words(self, words: &[i32], out: &mut [f32]) {
        match self {
            StoredFloat::F32 => out.iter_mut().zip(words).for_each(|(o, &w)| *o = f32::from_bits(w as u32)),
            StoredFloat::BF16 => out.chunks_exact_mut(2).zip(words).for_each(|(o, &w)| {
                o[0] = f32::from_bits((w as u32) << 16);
                o[1] = f32::from_bits(w as u32 & 0xffff_0000);
            }),
            StoredFloat::F16 => out.chunks_exact_mut(2).zip(words).for_each(|(o, &w)| {
                o[0] = half::f16::from_bits(w as u32 as u16).to_f32();
                o[1] = half::f16::from_bits((w as u32 >> 16) as u16).to_f32();
            }),
        }
    }

    /// Checks that `words` hold `[rows, cols]` values with rows starting on a word; returns the
    /// words per row.
    fn row_words(self, words: usize, rows: usize, cols: usize) -> Result<usize, String> {
        if cols % self.per_word() != 0 || words != rows * cols / self.per_word() {
            return Err(format!("{words} words for [{rows}, {cols}] {self:?}"));
        }
        Ok(cols / self.per_word())
    }
}

/// A frozen tensor `[rows, cols]` in the checkpoint's precision (embeddings, an untied lm_head):
/// its values' bits in i32 words, `per_word` values each, the first in the low bits (the bytes
/// as the file holds them), row-major. Split into `parts` of `rows_per_part` whole rows (the
/// last may hold fewer) where one buffer would exceed what the device can bind.
///
/// Or kept in host memory (`host`; see [`PackedWeight::on_host`]), as llama.cpp keeps token
/// embeddings: then `parts` is one word that only says which device the rows go to.
#[derive(Module, Debug)]
pub struct PackedWeight<B: Backend> {
    pub parts: Vec<Tensor<B, 1, Int>>,
    pub rows: usize,
    pub cols: usize,
    pub rows_per_part: usize,
    #[module(skip)]
    pub format: StoredFloat,
    #[module(skip)]
    pub host: Option<std::sync::Arc<Vec<i32>>>,
}

impl<B: Backend> PackedWeight<B> {
    /// From words holding the whole tensor, split into parts of at most `max_part_bytes`.
    /// `cols` must be a multiple of the values per word, so that rows start on a word.
    pub fn from_words(words: Vec<i32>, rows: usize, cols: usize, format: StoredFloat, max_part_bytes: u64, device: &B::Device) -> Result<Self, String> {
        let row_words = format.row_words(words.len(), rows, cols)?;
        let row_bytes = 4 * row_words as u64;
        if row_bytes > max_part_bytes {
            return Err(format!("one row takes {row_bytes} bytes, more than the {max_part_bytes} a buffer may hold here"));
        }
        let rows_per_part = ((max_part_bytes / row_bytes) as usize).clamp(1, rows.max(1));
        let parts = if rows <= rows_per_part {
            vec![words_tensor::<B>(words, device)]
        } else {
            words.chunks(rows_per_part * row_words).map(|c| words_tensor::<B>(c.to_vec(), device)).collect()
        };
        Ok(PackedWeight { parts, rows, cols, rows_per_part, format, host: None })
    }

    /// The same table kept in host memory, for one that is only ever looked up by row (an
    /// untied embedding): a lookup gathers and converts the rows it reads on the host and
    /// uploads those alone, so the table takes no device memory (197 MB for Phi-3-mini in bf16,
    /// 1.05 GB for Llama-3-8B). Reading the ids back is a blocking call, so native only.
    pub fn on_host(words: Vec<i32>, rows: usize, cols: usize, format: StoredFloat, device: &B::Device) -> Result<Self, String> {
        format.row_words(words.len(), rows, cols)?;
        let anchor = words_tensor::<B>(vec![0], device);
        Ok(PackedWeight { parts: vec![anchor], rows, cols, rows_per_part: rows, format, host: Some(std::sync::Arc::new(words)) })
    }

    /// Rows `ids` as f32 values, row-major, converted from the host copy.
    pub fn host_rows_f32(&self, ids: impl ExactSizeIterator<Item = usize>) -> Vec<f32> {
        let words = self.host.as_ref().expect("a table kept in host memory");
        let row_words = self.cols / self.format.per_word();
        let mut out = vec![0f32; ids.len() * self.cols];
        for (id, row) in ids.zip(out.chunks_exact_mut(self.cols)) {
            assert!(id < self.rows, "token id {id} is outside the embedding table's {} rows", self.rows);
            self.format.decode_words(&words[id * row_words..(id + 1) * row_words], row);
        }
        out
    }

    /// Host bytes of a table kept in host memory.
    pub fn host_bytes(&self) -> u64 {
        self.host.as_ref().map_or(0, |w| 4 * w.len() as u64)
    }

    /// Rows `start..` of part `p`, and how many it holds.
    pub fn part_rows(&self, p: usize) -> (usize, usize) {
        let start = p * self.rows_per_part;
        (start, self.rows_per_part.min(self.rows - start))
    }

    /// Device bytes.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| 4 * p.dims()[0] as u64).sum()
    }
}

/// A frozen base weight `[out, in]`: dense f32, NF4, or packed in the checkpoint's precision.
#[derive(Module, Debug)]
pub struct FrozenWeight<B: Backend> {
    pub dense: Option<Tensor<B, 2>>,
    pub nf4: Option<Nf4Weight<B>>,
    pub packed: Option<PackedWeight<B>>,
}

impl<B: Backend> FrozenWeight<B> {
    pub fn dense(w: Tensor<B, 2>) -> Self {
        FrozenWeight { dense: Some(w), nf4: None, packed: None }
    }
    pub fn nf4(w: Nf4Weight<B>) -> Self {
        FrozenWeight { dense: None, nf4: Some(w), packed: None }
    }
    pub fn packed(w: PackedWeight<B>) -> Self {
        FrozenWeight { dense: None, nf4: None, packed: Some(w) }
    }
    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.dense, &self.nf4, &self.packed) {
            (Some(w), _, _) => w.dims(),
            (_, Some(q), _) => [q.out_features, q.in_features],
            (_, _, Some(p)) => [p.rows, p.cols],
            _ => unreachable!("a frozen weight is dense, NF4 or packed"),
        }
    }
    pub fn is_quantized(&self) -> bool {
        self.nf4.is_some()
    }
    /// Where the weight lives (layers may sit on different devices).
    pub fn device(&self) -> B::Device {
        match (&self.dense, &self.nf4, &self.packed) {
            (Some(w), _, _) => w.device(),
            (_, Some(q), _) => q.words.device(),
            (_, _, Some(p)) => p.parts[0].device(),
            _ => unreachable!("a frozen weight is dense, NF4 or packed"),
        }
    }
    /// Device bytes it takes.
    pub fn bytes(&self) -> u64 {
        match (&self.dense, &self.nf4, &self.packed) {
            (Some(w), _, _) => 4 * w.shape().num_elements() as u64,
            (_, Some(q), _) => q.bytes(),
            (_, _, Some(p)) => p.bytes(),
            _ => 0,
        }
    }
}
