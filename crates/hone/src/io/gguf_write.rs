//! Writing GGUF (version 3, little-endian): metadata in the order given, the tensor table, then
//! each tensor's bytes at an offset aligned to `general.alignment` (32 unless the metadata says
//! otherwise), as llama.cpp's `gguf` writer lays them out. Read back by [`super::gguf::Gguf`].
//! [`encode`] turns f32 values into F32, F16, Q8_0 or Q4_0 blocks as ggml's reference
//! quantizers do (bit for bit with the `gguf` Python package's `quants.quantize`).

use super::gguf::{GgmlType, Value};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: usize = 32;

/// One tensor to write: `shape` in PyTorch order (`[rows, row length]`), `bytes` already in the
/// ggml type's layout.
pub struct TensorOut {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: GgmlType,
    pub bytes: Vec<u8>,
}

impl TensorOut {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        TensorOut { name: name.into(), shape, kind: GgmlType::F32, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
}

/// The whole file.
pub fn write(metadata: &[(String, Value)], tensors: &[TensorOut]) -> Vec<u8> {
    let infos: Vec<(String, Vec<usize>, GgmlType)> = tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.kind)).collect();
    let alignment = alignment(metadata);
    let mut out = header(metadata, &infos);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
        pad(&mut out, alignment);
    }
    out
}

/// The alignment of tensor data the metadata asks for.
pub fn alignment(metadata: &[(String, Value)]) -> usize {
    metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .map_or(DEFAULT_ALIGNMENT, |a| a.max(1) as usize)
}

/// Bytes of a tensor of `shape` stored as `kind`.
pub fn byte_len(shape: &[usize], kind: GgmlType) -> usize {
    let (values, bytes) = kind.block();
    shape.iter().product::<usize>() / values * bytes
}

/// Everything before the first tensor's bytes, padded: then each tensor's bytes follow in
/// `tensors`' order, each padded to [`alignment`] (how a file too large for memory is streamed).
pub fn header(metadata: &[(String, Value)], tensors: &[(String, Vec<usize>, GgmlType)]) -> Vec<u8> {
    let alignment = alignment(metadata);
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        out.extend_from_slice(&type_id(value).to_le_bytes());
        put(&mut out, value);
    }
    let mut offset = 0usize;
    for (name, shape, kind) in tensors {
        string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        // ggml's order: the row length first.
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&kind.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += byte_len(shape, *kind).next_multiple_of(alignment);
    }
    pad(&mut out, alignment);
    out
}

/// Zeros after `out` up to the next multiple of `alignment`.
pub fn pad(out: &mut Vec<u8>, alignment: usize) {
    out.resize(out.len().next_multiple_of(alignment), 0);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            // GGUF arrays are homogeneous: the first item's type stands for all (an empty array
            // is written as one of u8).
            let item = items.first().map_or(0, type_id);
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put(out, it);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// `values` (a whole number of blocks) as `kind`'s bytes: F32, F16 (round to nearest even), or
/// ggml's reference Q8_0 / Q4_0 quantization. Other kinds are not written by hone.
pub fn encode(kind: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let block = kind.block().0;
    if values.len() % block != 0 {
        return None;
    }
    Some(match kind {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => values.chunks_exact(32).flat_map(q8_0).collect(),
        GgmlType::Q4_0 => values.chunks_exact(32).flat_map(q4_0).collect(),
        _ => return None,
    })
}

/// ggml's `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d) half away from zero.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    out
}

/// ggml's `quantize_row_q4_0_ref`: d = (the value of largest magnitude) / -8, q = trunc(x / d
/// + 8.5) capped at 15; the first 16 values in the low nibbles, the last 16 in the high ones.
fn q4_0(x: &[f32]) -> Vec<u8> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..16).map(|j| q(x[j]) | (q(x[16 + j]) << 4)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::Gguf;
    use crate::io::MemSource;

    /// What is written reads back: every value type, alignment padding, tensor data and shapes.
    #[test]
    fn written_files_read_back() {
        let meta = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("a.u8".into(), Value::U8(7)),
            ("a.i32".into(), Value::I32(-3)),
            ("a.f32".into(), Value::F32(1.5)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.u64".into(), Value::U64(1 << 40)),
            ("a.f64".into(), Value::F64(-0.25)),
            ("a.arr".into(), Value::Array(vec![Value::U32(1), Value::U32(2)])),
            ("a.strs".into(), Value::Array(vec![Value::String("x".into()), Value::String("yz".into())])),
        ];
        let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..4).map(|i| -(i as f32)).collect();
        let bytes = write(&meta, &[TensorOut::f32("t.a", vec![3, 5], &a), TensorOut::f32("t.b", vec![4], &b)]);
        let g = Gguf::open(Box::new(MemSource::new("w.gguf", bytes))).unwrap();
        assert_eq!(g.version, 3);
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        assert_eq!(g.read_f32("t.a").unwrap(), (vec![3, 5], a));
        assert_eq!(g.read_f32("t.b").unwrap(), (vec![4], b));
        assert_eq!(g.tensors["t.b"].offset % 32, 0);
    }
}
