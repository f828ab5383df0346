//! NF4 (4-bit NormalFloat) exactly as bitsandbytes stores it: absmax per block of the row-major
//! flattened weight, the nearest of 16 code values (ties to the lower), two codes per byte with
//! the first element in the high nibble, and optionally double quantization of the absmax.

use super::dynamic_map::{lut_cell, quantize_lut, signed_dynamic_map};

/// bitsandbytes' NF4 code values (QLoRA paper, appendix E), as f32: the table the GPU kernels
/// use, kept once in `shaders/`.
pub const NF4_CODE: [f32; 16] = hone_shaders::nf4::CODE;

/// Block size of the nested (double) quantization of absmax.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Double-quantized absmax: 8-bit codes of `absmax - offset` in blocks of 256.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
}

/// A quantized weight in bitsandbytes' layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

pub fn check_blocksize(blocksize: usize) -> Result<(), String> {
    if (32..=4096).contains(&blocksize) && blocksize.is_power_of_two() {
        Ok(())
    } else {
        Err(format!("NF4 block size {blocksize} must be a power of two from 32 to 4096"))
    }
}

/// Per-block absmax of `x` (the last block may be partial).
fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect()
}

/// Scales each value into [-1, 1] by its block's absmax the way bitsandbytes' reference
/// kernel does: full blocks multiply by the f32 reciprocal, a partial last block divides.
fn scaled(x: &[f32], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let full = x.len() / blocksize * blocksize;
    let mut out = Vec::with_capacity(x.len());
    for (i, &v) in x.iter().enumerate() {
        let am = absmax[i / blocksize].max(1e-38);
        let s = if i < full { v * (1.0 / am) } else { v / am };
        out.push(s.clamp(-1.0, 1.0));
    }
    out
}

/// Index of the nearest code in sorted `code`: the number of midpoints strictly below `v`
/// (`torch.bucketize(v, midpoints)`), so a tie goes to the lower code.
fn nearest(v: f32, midpoints: &[f32]) -> u8 {
    midpoints.partition_point(|&m| m < v) as u8
}

fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}


/// bitsandbytes' CPU `quantize_blockwise` (8-bit codes of the signed dynamic map, absmax per
/// block), through its lookup grid ([`quantize_lut`]) so that double-quantized absmax codes
/// match bit for bit.
pub fn quantize_blockwise_8bit(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    quantize_blockwise_with(x, blocksize, &signed_dynamic_map())
}

/// [`quantize_blockwise_8bit`] into any sorted 256-value `code` (8-bit AdamW's second moment
/// uses the unsigned map).
pub fn quantize_blockwise_with(x: &[f32], blocksize: usize, code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(code);
    let absmax = block_absmax(x, blocksize);
    let codes = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let am = absmax[i / blocksize];
            if am == 0.0 {
                return 0;
            }
            lut[lut_cell((v * (1.0 / am)).clamp(-1.0, 1.0))]
        })
        .collect();
    (codes, absmax)
}

pub fn dequantize_blockwise_8bit(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let code = signed_dynamic_map();
    codes.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax[i / blocksize]).collect()
}

/// Quantizes a weight that arrives in pieces (streamed from a file), holding only the codes
/// and per-block statistics: pieces must be whole blocks, except the last. The result equals
/// [`Nf4Tensor::quantize`] of the whole weight, double quantization included (it needs every
/// absmax, so it runs in [`Nf4Builder::finish`]).
pub struct Nf4Builder {
    shape: Vec<usize>,
    blocksize: usize,
    double_quant: bool,
    numel: usize,
    seen: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    /// Per block Σ code², Σ code·x, and the total Σ x²: the quantization error once the final
    /// (possibly double-quantized) absmax is known, without keeping the weight.
    stats: Vec<(f64, f64)>,
    sum_sq: f64,
}

impl Nf4Builder {
    pub fn new(shape: &[usize], blocksize: usize, double_quant: bool) -> Result<Self, String> {
        check_blocksize(blocksize)?;
        let numel: usize = shape.iter().product();
        let blocks = numel.div_ceil(blocksize);
        Ok(Nf4Builder {
            shape: shape.to_vec(),
            blocksize,
            double_quant,
            numel,
            seen: 0,
            packed: Vec::with_capacity(numel.div_ceil(2)),
            absmax: Vec::with_capacity(blocks),
            stats: Vec::with_capacity(blocks),
            sum_sq: 0.0,
        })
    }

    pub fn push(&mut self, x: &[f32]) -> Result<(), String> {
        if self.seen + x.len() > self.numel {
            return Err(format!("more than {} values for shape {:?}", self.numel, self.shape));
        }
        if x.len() % self.blocksize != 0 && self.seen + x.len() != self.numel {
            return Err(format!("a piece of {} values is not whole blocks of {}", x.len(), self.blocksize));
        }
        self.seen += x.len();
        let absmax = block_absmax(x, self.blocksize);
        let mids = midpoints(&NF4_CODE);
        let q: Vec<u8> = scaled(x, &absmax, self.blocksize).into_iter().map(|s| nearest(s, &mids)).collect();
        let pad = nearest(0.0, &mids);
        self.packed.extend(q.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(pad)));
        for (codes, values) in q.chunks(self.blocksize).zip(x.chunks(self.blocksize)) {
            let (mut cc, mut cx) = (0f64, 0f64);
            for (&c, &v) in codes.iter().zip(values) {
                let c = NF4_CODE[c as usize] as f64;
                cc += c * c;
                cx += c * v as f64;
                self.sum_sq += (v as f64) * (v as f64);
            }
            self.stats.push((cc, cx));
        }
        self.absmax.extend(absmax);
        Ok(())
    }

    /// The quantized weight, and its relative error ‖deq − W‖ / ‖W‖ as (Σ(deq − W)², ΣW²).
    pub fn finish(self) -> Result<(Nf4Tensor, (f64, f64)), String> {
        if self.seen != self.numel {
            return Err(format!("{} values for shape {:?}", self.seen, self.shape));
        }
        let absmax = if self.double_quant {
            let offset = super::torch_sum::mean(&self.absmax);
            let centered: Vec<f32> = self.absmax.iter().map(|a| a - offset).collect();
            let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, NESTED_BLOCKSIZE);
            Absmax::Nested(NestedAbsmax { codes, nested_absmax, offset })
        } else {
            Absmax::Plain(self.absmax)
        };
        let q = Nf4Tensor { shape: self.shape, blocksize: self.blocksize, packed: self.packed, absmax };
        // Σ(a·c − x)² per block = a²·Σc² − 2a·Σcx + Σx², with a the absmax dequantization uses.
        let diff: f64 = q.absmax_f32().iter().zip(&self.stats).map(|(&a, &(cc, cx))| (a as f64).powi(2) * cc - 2.0 * a as f64 * cx).sum::<f64>() + self.sum_sq;
        Ok((q, (diff.max(0.0), self.sum_sq)))
    }
}

impl Nf4Tensor {
    /// Quantizes a row-major f32 weight. `double_quant` also quantizes the absmax (QLoRA's
    /// `bnb_4bit_use_double_quant`).
    pub fn quantize(weight: &[f32], shape: &[usize], blocksize: usize, double_quant: bool) -> Result<Self, String> {
        check_blocksize(blocksize)?;
        let numel: usize = shape.iter().product();
        if numel != weight.len() {
            return Err(format!("{} values for shape {shape:?}", weight.len()));
        }
        let absmax = block_absmax(weight, blocksize);
        let mids = midpoints(&NF4_CODE);
        let q: Vec<u8> = scaled(weight, &absmax, blocksize).into_iter().map(|s| nearest(s, &mids)).collect();
        // An odd count is padded with 0.0, whose code fills the last low nibble (as bitsandbytes pads).
        let pad = nearest(0.0, &mids);
        let packed = q.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(pad)).collect();
        let absmax = if double_quant {
            let offset = super::torch_sum::mean(&absmax);
            let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, NESTED_BLOCKSIZE);
            Absmax::Nested(NestedAbsmax { codes, nested_absmax, offset })
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Tensor { shape: shape.to_vec(), blocksize, packed, absmax })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Per-block absmax as f32 (undoing double quantization as bitsandbytes does).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => dequantize_blockwise_8bit(&n.codes, &n.nested_absmax, NESTED_BLOCKSIZE)
                .into_iter()
                .map(|a| a + n.offset)
                .collect(),
        }
    }

    /// The reference dequantization on the CPU: `code[q] * absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        (0..self.numel())
            .map(|i| {
                let byte = self.packed[i / 2];
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                NF4_CODE[q as usize] * absmax[i / self.blocksize]
            })
            .collect()
    }
}
