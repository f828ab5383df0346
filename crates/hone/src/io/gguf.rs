//! GGUF (versions 2 and 3): metadata, the tensor table, and tensors read one at a time and
//! dequantized to f32 exactly as the `gguf` Python package does (same formulas, same order of
//! f32 operations), for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K.

use super::ByteSource;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

const MAGIC: u32 = 0x4655_4747; // "GGUF"

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// ggml tensor types hone reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// ggml's type ids of the types hone reads (and writes).
const TYPE_IDS: [(GgmlType, u32); 11] = [
    (GgmlType::F32, 0),
    (GgmlType::F16, 1),
    (GgmlType::Q4_0, 2),
    (GgmlType::Q4_1, 3),
    (GgmlType::Q5_0, 6),
    (GgmlType::Q5_1, 7),
    (GgmlType::Q8_0, 8),
    (GgmlType::Q4K, 12),
    (GgmlType::Q5K, 13),
    (GgmlType::Q6K, 14),
    (GgmlType::BF16, 30),
];

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        TYPE_IDS.iter().find(|(_, i)| *i == id).map(|(k, _)| *k)
    }
    /// ggml's id of the type, as a GGUF tensor table stores it.
    pub fn id(self) -> u32 {
        TYPE_IDS.iter().find(|(k, _)| *k == self).map(|(_, i)| *i).expect("every GgmlType has an id")
    }
    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// ggml's GGML_MAX_DIMS: no GGUF tensor has more.
const MAX_DIMS: usize = 4;

#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// GGUF order: `dims[0]` is the row length (the fastest-moving dimension).
    pub dims: Vec<usize>,
    pub kind: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
}

impl GgufTensor {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    /// PyTorch order (`dims` reversed): `[rows, row length]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
    pub fn byte_len(&self) -> usize {
        let (values, bytes) = self.kind.block();
        self.numel() / values * bytes
    }
}

pub struct Gguf {
    source: Box<dyn ByteSource>,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, GgufTensor>,
}

/// Sequential reads through a byte source (the header is parsed front to back).
struct Cursor<'a> {
    src: &'a dyn ByteSource,
    pos: u64,
}

impl Cursor<'_> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        if self.pos + n as u64 > self.src.len() {
            return Err(Error::format(self.src.name(), format!("truncated GGUF header at byte {}", self.pos)));
        }
        let v = self.src.read_vec(self.pos, n)?;
        self.pos += n as u64;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > 1 << 30 {
            return Err(Error::format(self.src.name(), format!("string of {n} bytes at byte {}", self.pos)));
        }
        String::from_utf8(self.bytes(n as usize)?).map_err(|_| Error::format(self.src.name(), "string is not UTF-8"))
    }
    fn value(&mut self, kind: u32) -> Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.bytes(1)?[0]),
            1 => Value::I8(self.bytes(1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.bytes(2)?.try_into().unwrap())),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.bytes(1)?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let item = self.u32()?;
                let n = self.u64()?;
                if n > 1 << 28 {
                    return Err(Error::format(self.src.name(), format!("array of {n} items")));
                }
                // Byte arrays in bulk; anything else one by one.
                if item == 0 {
                    Value::Array(self.bytes(n as usize)?.into_iter().map(Value::U8).collect())
                } else {
                    (0..n).map(|_| self.value(item)).collect::<Result<Vec<_>>>().map(Value::Array)?
                }
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(Error::format(self.src.name(), format!("unknown metadata type {other}"))),
        })
    }
}

impl Gguf {
    pub fn open(source: Box<dyn ByteSource>) -> Result<Self> {
        let file = source.name().to_string();
        let mut c = Cursor { src: source.as_ref(), pos: 0 };
        if c.u32()? != MAGIC {
            return Err(Error::format(&file, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(&file, format!("GGUF version {version} (hone reads 2 and 3)")));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let kind = c.u32()?;
            let value = c.value(kind)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > MAX_DIMS {
                return Err(Error::tensor(&file, &name, format!("{n_dims} dimensions (GGUF has at most {MAX_DIMS})")));
            }
            let dims = (0..n_dims).map(|_| c.u64().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
            let kind_id = c.u32()?;
            let offset = c.u64()?;
            let kind = GgmlType::from_id(kind_id)
                .ok_or_else(|| Error::tensor(&file, &name, format!("unsupported ggml type {kind_id}")))?;
            infos.push((name, dims, kind, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32).max(1);
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, kind, offset) in infos {
            // Sizes and offsets come from the file: counted without overflow before any read.
            let numel = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let end = numel.and_then(|n| (n / kind.block().0 as u64).checked_mul(kind.block().1 as u64)).and_then(|b| b.checked_add(offset)).and_then(|e| e.checked_add(data_start));
            let (Some(numel), Some(end)) = (numel, end) else {
                return Err(Error::tensor(&file, &name, format!("dimensions {dims:?} at offset {offset} are too large to exist")));
            };
            let t = GgufTensor { name: name.clone(), dims, kind, offset: data_start + offset };
            if numel % t.kind.block().0 as u64 != 0 {
                return Err(Error::tensor(&file, &name, "size is not a whole number of blocks"));
            }
            if end > source.len() {
                return Err(Error::tensor(&file, &name, "data lies past the end of the file (truncated?)"));
            }
            tensors.insert(name, t);
        }
        Ok(Gguf { source, version, metadata, tensors })
    }

    pub fn name(&self) -> &str {
        self.source.name()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// One tensor dequantized to f32, in PyTorch order.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensors.get(name).ok_or_else(|| Error::tensor(self.name(), name, "missing"))?;
        let bytes = self.source.read_vec(t.offset, t.byte_len())?;
        Ok((t.shape(), dequantize(t.kind, &bytes)))
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_K / Q5_K scales and mins of the 8 sub-blocks, from their 12 packed bytes.
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (d, m, md) = (&s[0..4], &s[4..8], &s[8..12]);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = d[i] & 0x3F;
        sc[i + 4] = (md[i] & 0x0F) | ((d[i] >> 2) & 0x30);
        mn[i] = m[i] & 0x3F;
        mn[i + 4] = (md[i] >> 4) | ((m[i] >> 2) & 0x30);
    }
    (sc, mn)
}

pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (values, size) = kind.block();
    let mut out = Vec::with_capacity(bytes.len() / size * values);
    for b in bytes.chunks_exact(size) {
        match kind {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16(b)),
            GgmlType::BF16 => out.push(f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            GgmlType::Q8_0 => {
                let d = f16(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4_0 => {
                let d = f16(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| d * ((q & 0x0F) as i8 - 8) as f32));
                out.extend(qs.iter().map(|q| d * ((q >> 4) as i8 - 8) as f32));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| d * (q & 0x0F) as f32 + m));
                out.extend(qs.iter().map(|q| d * (q >> 4) as f32 + m));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (d, m, rest) = if kind == GgmlType::Q5_0 { (f16(&b[0..2]), 0.0, &b[2..]) } else { (f16(&b[0..2]), f16(&b[2..4]), &b[4..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for j in 0..32 {
                    let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
                    let q = low | ((((qh >> j) & 1) as u8) << 4);
                    out.push(if kind == GgmlType::Q5_0 { d * (q as i8 - 16) as f32 } else { d * q as f32 + m });
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
                let (sc, mn) = scale_min_k4(&b[4..16]);
                let (qh, qs) = if kind == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                for sub in 0..8 {
                    let ds = d * sc[sub] as f32;
                    let dm = dmin * mn[sub] as f32;
                    let group = &qs[(sub / 2) * 32..(sub / 2) * 32 + 32];
                    for l in 0..32 {
                        let mut q = if sub % 2 == 0 { group[l] & 0x0F } else { group[l] >> 4 };
                        if let Some(qh) = qh {
                            q |= ((qh[l] >> sub) & 1) << 4;
                        }
                        out.push(ds * q as f32 - dm);
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16(&b[208..210]);
                for g in 0..8 {
                    let (h, k) = (g / 4, g % 4);
                    for l in 0..32 {
                        let low = (ql[h * 64 + (k % 2) * 32 + l] >> (4 * (k / 2))) & 0x0F;
                        let high = (qh[h * 32 + l] >> (2 * k)) & 0x03;
                        let q = (low | (high << 4)) as i8 - 32;
                        let i = g * 32 + l;
                        out.push((d * scales[i / 16] as i8 as f32) * q as f32);
                    }
                }
            }
        }
    }
    out
}
