//! Reading safetensors files by range: the header is parsed and checked once, then each tensor
//! is read on its own when the loader asks for it.

use super::ByteSource;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Header lengths past this are not a safetensors file (the format caps the header at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    U8,
    I64,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "U8" => Dtype::U8,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U8 => 1,
            Dtype::I64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U8 => "U8",
            Dtype::I64 => "I64",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One safetensors file: its checked header and the source to read tensors from.
pub struct SafeTensors {
    source: Box<dyn ByteSource>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafeTensors {
    /// Reads and checks the header: every tensor's range lies inside the file and matches its
    /// shape and dtype. Unknown dtypes are rejected here, naming the tensor.
    pub fn open(source: Box<dyn ByteSource>) -> Result<Self> {
        let file = source.name().to_string();
        let total = source.len();
        if total < 8 {
            return Err(Error::format(&file, format!("not a safetensors file: {total} bytes, shorter than the 8-byte header length")));
        }
        let mut len_bytes = [0u8; 8];
        source.read_at(0, &mut len_bytes)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER || 8 + header_len > total {
            return Err(Error::format(
                &file,
                format!("truncated or not safetensors: header says {header_len} bytes but the file has {total}"),
            ));
        }
        let header = source.read_vec(8, header_len as usize)?;
        let json: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| Error::format(&file, format!("header is not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| Error::format(&file, "header is not a JSON object"))?;
        let data_start = 8 + header_len;
        let data_len = total - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in obj {
            if name == "__metadata__" {
                if let Some(m) = entry.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let info = parse_entry(entry).map_err(|m| Error::tensor(&file, name, m))?;
            let (dtype_s, shape, begin, end) = info;
            let dtype = Dtype::parse(&dtype_s).ok_or_else(|| {
                Error::tensor(&file, name, format!("unsupported dtype {dtype_s} (hone reads F32, F16, BF16, U8, I64)"))
            })?;
            if begin > end || end > data_len {
                return Err(Error::tensor(
                    &file,
                    name,
                    format!("data_offsets [{begin}, {end}] lie outside the file's {data_len} data bytes (truncated file or lying header)"),
                ));
            }
            // A lying header can claim any size: counted without overflow, refused before any read.
            let want = shape
                .iter()
                .try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d as u64))
                .ok_or_else(|| Error::tensor(&file, name, format!("shape {shape:?} is too large to exist")))?;
            if end - begin != want {
                return Err(Error::tensor(
                    &file,
                    name,
                    format!("data_offsets span {} bytes but shape {shape:?} of {} needs {want}", end - begin, dtype.name()),
                ));
            }
            tensors.insert(name.clone(), TensorInfo { dtype, shape, start: data_start + begin, end: data_start + end });
        }
        Ok(SafeTensors { source, tensors, metadata })
    }

    pub fn name(&self) -> &str {
        self.source.name()
    }
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw bytes of one tensor.
    pub fn read_raw(&self, name: &str) -> Result<(TensorInfo, Vec<u8>)> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(self.name(), name, "missing"))?
            .clone();
        let bytes = self.source.read_vec(info.start, (info.end - info.start) as usize)?;
        Ok((info, bytes))
    }

    /// One floating-point tensor converted to f32 (the compute dtype everywhere: the WebGPU
    /// adapters hone targets need not have f16).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, bytes) = self.read_raw(name)?;
        let values = to_f32(info.dtype, &bytes).ok_or_else(|| {
            Error::tensor(self.name(), name, format!("dtype {} is not a floating-point weight", info.dtype.name()))
        })?;
        Ok((info.shape, values))
    }
}

impl SafeTensors {
    /// One tensor's stored bytes as little-endian i32 words (zero-padded to a whole word), read
    /// straight into the words' memory: the bytes are never held twice.
    pub fn read_words(&self, name: &str) -> Result<(Dtype, Vec<i32>)> {
        let info = self.tensors.get(name).ok_or_else(|| Error::tensor(self.name(), name, "missing"))?;
        let len = (info.end - info.start) as usize;
        let mut words = vec![0i32; len.div_ceil(4)];
        // SAFETY: an i32 slice viewed as its bytes (every bit pattern is a valid i32); the
        // targets hone builds for are little-endian, so byte order is the file's.
        let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 4) };
        const PIECE: usize = 64 << 20;
        for (i, piece) in bytes[..len].chunks_mut(PIECE).enumerate() {
            self.source.read_at(info.start + (i * PIECE) as u64, piece)?;
        }
        Ok((info.dtype, words))
    }

    /// One floating-point tensor as f32, `chunk` values at a time (the last piece may be
    /// shorter), so that only one piece of it is ever in memory.
    pub fn read_f32_chunks(&self, name: &str, chunk: usize, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let info = self.tensors.get(name).ok_or_else(|| Error::tensor(self.name(), name, "missing"))?;
        let size = info.dtype.size();
        let numel = ((info.end - info.start) as usize) / size;
        let mut at = 0usize;
        while at < numel {
            let n = chunk.max(1).min(numel - at);
            let bytes = self.source.read_vec(info.start + (at * size) as u64, n * size)?;
            let values = to_f32(info.dtype, &bytes).ok_or_else(|| {
                Error::tensor(self.name(), name, format!("dtype {} is not a floating-point weight", info.dtype.name()))
            })?;
            drop(bytes);
            f(&values)?;
            at += n;
        }
        Ok(())
    }
}

fn parse_entry(entry: &serde_json::Value) -> Result<(String, Vec<usize>, u64, u64), String> {
    let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or("no dtype")?.to_string();
    let shape = entry
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or("shape is not a list of sizes"))
        .collect::<Result<Vec<_>, _>>()?;
    let offsets = entry.get("data_offsets").and_then(|o| o.as_array()).ok_or("no data_offsets")?;
    match offsets.as_slice() {
        [a, b] => Ok((dtype, shape, a.as_u64().ok_or("bad data_offsets")?, b.as_u64().ok_or("bad data_offsets")?)),
        _ => Err("data_offsets must be two numbers".into()),
    }
}

/// Little-endian F32/F16/BF16 bytes to f32; `None` for non-float dtypes.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Serializes f32 tensors as a safetensors file, keys sorted so the same tensors always give
/// the same bytes.
pub fn write_f32(tensors: &[(&str, &[usize], &[f32])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let entries: Vec<(&str, Dtype, &[usize], &[u8])> = tensors.iter().zip(&bytes).map(|((n, s, _), b)| (*n, Dtype::F32, *s, b.as_slice())).collect();
    write_tensors(&entries, metadata)
}

/// Serializes tensors of any dtype given as little-endian bytes (name, dtype, shape, bytes),
/// keys sorted as in [`write_f32`].
pub fn write_tensors(tensors: &[(&str, Dtype, &[usize], &[u8])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, data) in &sorted {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>() * dtype.size(), "{name}");
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + data.len()]}),
        );
        offset += data.len();
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    // Pad with spaces to 8-byte alignment, as the reference writer does.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, _, _, data) in &sorted {
        out.extend_from_slice(data);
    }
    out
}

/// Writes a safetensors file tensor by tensor: the header is laid out from the declared
/// tensors first, then each tensor's bytes are appended in that order, so a model is never
/// held whole in memory. Keys are sorted, as in [`write_f32`].
#[cfg(not(target_arch = "wasm32"))]
pub struct StreamWriter {
    file: std::io::BufWriter<std::fs::File>,
    order: Vec<(String, usize)>,
    next: usize,
}

#[cfg(not(target_arch = "wasm32"))]
impl StreamWriter {
    /// `tensors`: (name, dtype, shape). Tensors must then be written in sorted name order
    /// (see [`StreamWriter::order`]).
    pub fn create(path: &std::path::Path, tensors: &[(String, Dtype, Vec<usize>)], metadata: &BTreeMap<String, String>) -> Result<Self> {
        use std::io::Write;
        let mut sorted: Vec<_> = tensors.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
        }
        let mut offset = 0usize;
        let mut order = Vec::new();
        for (name, dtype, shape) in &sorted {
            let len = shape.iter().product::<usize>() * dtype.size();
            header.insert(name.clone(), serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}));
            order.push((name.clone(), len));
            offset += len;
        }
        let mut header = serde_json::to_vec(&header).expect("json");
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let name = path.display().to_string();
        let file = std::fs::File::create(path).map_err(|e| Error::io(&name, e))?;
        let mut file = std::io::BufWriter::new(file);
        file.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| Error::io(&name, e))?;
        file.write_all(&header).map_err(|e| Error::io(&name, e))?;
        Ok(StreamWriter { file, order, next: 0 })
    }

    /// The names in the order their bytes must be written.
    pub fn order(&self) -> Vec<String> {
        self.order.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let (want, len) = self.order.get(self.next).ok_or_else(|| Error::tensor("(writer)", name, "more tensors than declared"))?;
        if want != name || *len != bytes.len() {
            return Err(Error::tensor("(writer)", name, format!("expected `{want}` of {len} bytes next")));
        }
        self.file.write_all(bytes).map_err(|e| Error::io(name, e))?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        use std::io::Write;
        if self.next != self.order.len() {
            return Err(Error::io("(writer)", format!("{} of {} tensors written", self.next, self.order.len())));
        }
        self.file.flush().map_err(|e| Error::io("(writer)", e))?;
        self.file.into_inner().map_err(|e| Error::io("(writer)", e.to_string()))?.sync_all().map_err(|e| Error::io("(writer)", e))
    }
}

/// f32 values encoded as `dtype` (round to nearest even for F16/BF16, as torch's `.to()`).
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => return None,
    })
}
