//! Products and lookups on packed frozen tensors (the checkpoint's own precision, see
//! [`crate::quant::frozen::PackedWeight`]) written with tensor ops and the backend's
//! [`HoneBackend::unpack_words`]: W is unpacked a chunk of rows at a time, so the f32 copy
//! alive at once is one chunk (a few MB), never the whole weight. Backends with their own
//! fused versions (the CPU) override the ops that call these.

use super::HoneBackend;
use crate::quant::frozen::PackedWeight;
use burn::tensor::{Int, Tensor, TensorData};

/// f32 bytes of W unpacked at once.
pub const CHUNK_BYTES: usize = 16 << 20;

/// Rows per unpacked chunk of a `cols`-wide weight.
pub fn chunk_rows(cols: usize) -> usize {
    (CHUNK_BYTES / (4 * cols.max(1))).max(1)
}

/// Each chunk of rows of W as `(first row, f32 [rows, cols])`, in order.
fn chunks<B: HoneBackend>(p: &PackedWeight<B>) -> Box<dyn Iterator<Item = (usize, Tensor<B, 2>)> + '_> {
    let per_word = p.format.per_word();
    let row_words = p.cols / per_word;
    let step = chunk_rows(p.cols);
    if p.host.is_some() {
        // A table in host memory: each chunk converted there and uploaded.
        let device = p.parts[0].device();
        return Box::new((0..p.rows).step_by(step).map(move |r0| {
            let n = step.min(p.rows - r0);
            (r0, Tensor::from_data(TensorData::new(p.host_rows_f32(r0..r0 + n), [n, p.cols]), &device))
        }));
    }
    Box::new((0..p.parts.len()).flat_map(move |part| {
        let (start, rows) = p.part_rows(part);
        (0..rows).step_by(step).map(move |r0| {
            let n = step.min(rows - r0);
            let words = p.parts[part].clone().narrow(0, r0 * row_words, n * row_words);
            (start + r0, B::unpack_words(words, p.format).reshape([n, p.cols]))
        })
    }))
}

/// `x·Wᵀ` `[m, rows]` for `x: [m, cols]`.
pub fn matmul_t<B: HoneBackend>(x: Tensor<B, 2>, p: &PackedWeight<B>) -> Tensor<B, 2> {
    let outs: Vec<Tensor<B, 2>> = chunks(p).map(|(_, w)| B::matmul(w, x.clone().transpose()).transpose()).collect();
    Tensor::cat(outs, 1)
}

/// `dy·W` `[m, cols]` for `dy: [m, rows]`.
pub fn matmul<B: HoneBackend>(dy: Tensor<B, 2>, p: &PackedWeight<B>) -> Tensor<B, 2> {
    let mut dx: Option<Tensor<B, 2>> = None;
    for (r0, w) in chunks(p) {
        let n = w.dims()[0];
        let part = B::matmul(dy.clone().narrow(1, r0, n), w);
        dx = Some(match dx {
            Some(acc) => acc + part,
            None => part,
        });
    }
    dx.expect("a packed weight has rows")
}

/// Rows `ids` `[n]` as f32 `[n, cols]`: each part's words gathered by row, unpacked; where the
/// weight is split, every part contributes the rows it holds (the others masked out).
pub fn rows<B: HoneBackend>(p: &PackedWeight<B>, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let n = ids.dims()[0];
    if p.host.is_some() {
        // The model hands host ids to host tables (`CausalLm::embed`); ids on a device are read
        // back here, a blocking wait (native only).
        return host_rows(p, &ids.into_data().iter::<i64>().collect::<Vec<_>>());
    }
    let row_words = p.cols / p.format.per_word();
    let gather = |part: usize, local: Tensor<B, 1, Int>| {
        let (_, rows) = p.part_rows(part);
        let table = p.parts[part].clone().reshape([rows, row_words]);
        B::unpack_words(table.select(0, local).reshape([n * row_words]), p.format).reshape([n, p.cols])
    };
    if p.parts.len() == 1 {
        return gather(0, ids);
    }
    let mut out: Option<Tensor<B, 2>> = None;
    for part in 0..p.parts.len() {
        let (start, rows) = p.part_rows(part);
        let local = ids.clone().sub_scalar(start as i64);
        let inside = local.clone().greater_equal_elem(0).int() * local.clone().lower_elem(rows as i64).int();
        let outside = inside.equal_elem(0).unsqueeze_dim::<2>(1).expand([n, p.cols]);
        let values = gather(part, local.clamp(0, rows as i64 - 1)).mask_fill(outside, 0.0);
        out = Some(match out {
            Some(acc) => acc + values,
            None => values,
        });
    }
    out.expect("a packed weight has parts")
}

/// Rows `ids` of a table kept in host memory as f32 `[n, cols]`: converted on the host, then
/// uploaded to the table's device.
pub fn host_rows<B: HoneBackend>(p: &PackedWeight<B>, ids: &[i64]) -> Tensor<B, 2> {
    let rows = p.host_rows_f32(ids.iter().map(|&i| usize::try_from(i).unwrap_or(usize::MAX)));
    Tensor::from_data(TensorData::new(rows, [ids.len(), p.cols]), &p.parts[0].device())
}

/// The whole weight as f32 (merges and tests).
pub fn dense<B: HoneBackend>(p: &PackedWeight<B>) -> Tensor<B, 2> {
    Tensor::cat(chunks(p).map(|(_, w)| w).collect(), 0)
}
