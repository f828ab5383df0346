//! bitsandbytes' serialized 4-bit layout, as transformers saves and loads it: for a weight `W`,
//! `W` (u8 codes, `[n/2, 1]`), `W.absmax` (u8 codes of the double-quantized absmax, or f32),
//! `W.nested_absmax`, `W.nested_quant_map`, `W.quant_map`, and
//! `W.quant_state.bitsandbytes__nf4` (JSON as bytes).

use super::dynamic_map::signed_dynamic_map;
use super::nf4::{Absmax, NestedAbsmax, Nf4Tensor, NESTED_BLOCKSIZE, NF4_CODE};
use crate::io::safetensors::Dtype;

pub const QUANT_STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

/// One serialized tensor: name, dtype, shape, little-endian bytes.
pub type Serialized = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Python's `repr` of a float (what `json.dumps` writes): shortest round-trip digits, in
/// scientific notation below 1e-4 or from 1e16.
pub fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{x:e}"); // shortest digits, e.g. "2.1060752868652344e-1"
    let (mantissa, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let plain = format!("{x}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// The quant-state JSON, byte for byte as bitsandbytes writes it.
pub fn quant_state_json(q: &Nf4Tensor) -> Vec<u8> {
    let shape = q.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!("{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{shape}]", q.blocksize);
    if let Absmax::Nested(n) = &q.absmax {
        s += &format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(n.offset as f64)
        );
    }
    s.push('}');
    s.into_bytes()
}

/// The tensors transformers writes for a 4-bit weight named `name` (e.g. `...q_proj.weight`).
pub fn serialize(name: &str, q: &Nf4Tensor) -> Vec<Serialized> {
    let mut out = vec![(name.to_string(), Dtype::U8, vec![q.packed.len(), 1], q.packed.clone())];
    match &q.absmax {
        Absmax::Plain(a) => out.push((format!("{name}.absmax"), Dtype::F32, vec![a.len()], f32_bytes(a))),
        Absmax::Nested(n) => {
            out.push((format!("{name}.absmax"), Dtype::U8, vec![n.codes.len()], n.codes.clone()));
            out.push((format!("{name}.nested_absmax"), Dtype::F32, vec![n.nested_absmax.len()], f32_bytes(&n.nested_absmax)));
            out.push((format!("{name}.nested_quant_map"), Dtype::F32, vec![256], f32_bytes(&signed_dynamic_map())));
        }
    }
    out.push((format!("{name}.quant_map"), Dtype::F32, vec![16], f32_bytes(&NF4_CODE)));
    let json = quant_state_json(q);
    out.push((format!("{name}.{QUANT_STATE_SUFFIX}"), Dtype::U8, vec![json.len()], json));
    out
}

/// Rebuilds the quantized weight from its serialized parts (`get` returns a tensor's raw bytes
/// by name). Errors name the missing or inconsistent part.
pub fn deserialize(name: &str, mut get: impl FnMut(&str) -> Result<Option<Vec<u8>>, String>) -> Result<Nf4Tensor, String> {
    let need = |get: &mut dyn FnMut(&str) -> Result<Option<Vec<u8>>, String>, key: String| -> Result<Vec<u8>, String> {
        get(&key)?.ok_or_else(|| format!("missing `{key}`"))
    };
    let state_key = format!("{name}.{QUANT_STATE_SUFFIX}");
    let state: serde_json::Value =
        serde_json::from_slice(&need(&mut get, state_key.clone())?).map_err(|e| format!("`{state_key}` is not JSON: {e}"))?;
    if state.get("quant_type").and_then(|v| v.as_str()) != Some("nf4") {
        return Err(format!("`{state_key}`: only nf4 is supported"));
    }
    let blocksize = state.get("blocksize").and_then(|v| v.as_u64()).ok_or("quant state without blocksize")? as usize;
    let shape: Vec<usize> = state
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or("quant state without shape")?
        .iter()
        .filter_map(|d| d.as_u64().map(|d| d as usize))
        .collect();
    let packed = need(&mut get, name.to_string())?;
    let numel: usize = shape.iter().product();
    if packed.len() != numel.div_ceil(2) {
        return Err(format!("`{name}` has {} bytes, shape {shape:?} needs {}", packed.len(), numel.div_ceil(2)));
    }
    let n_blocks = numel.div_ceil(blocksize);
    let absmax_bytes = need(&mut get, format!("{name}.absmax"))?;
    let to_f32s = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    let absmax = match state.get("nested_offset").and_then(|v| v.as_f64()) {
        Some(offset) => {
            if state.get("nested_blocksize").and_then(|v| v.as_u64()) != Some(NESTED_BLOCKSIZE as u64) {
                return Err(format!("`{state_key}`: nested block size must be {NESTED_BLOCKSIZE}"));
            }
            let map = to_f32s(&need(&mut get, format!("{name}.nested_quant_map"))?);
            if map.iter().map(|v| v.to_bits()).ne(signed_dynamic_map().iter().map(|v| v.to_bits())) {
                return Err(format!("`{name}.nested_quant_map` is not bitsandbytes' dynamic map"));
            }
            if absmax_bytes.len() != n_blocks {
                return Err(format!("`{name}.absmax` has {} codes, expected {n_blocks}", absmax_bytes.len()));
            }
            Absmax::Nested(NestedAbsmax {
                codes: absmax_bytes,
                nested_absmax: to_f32s(&need(&mut get, format!("{name}.nested_absmax"))?),
                offset: offset as f32,
            })
        }
        None => Absmax::Plain(to_f32s(&absmax_bytes)),
    };
    let code = to_f32s(&need(&mut get, format!("{name}.quant_map"))?);
    if code.iter().map(|v| v.to_bits()).ne(NF4_CODE.iter().map(|v| v.to_bits())) {
        return Err(format!("`{name}.quant_map` is not the NF4 code"));
    }
    Ok(Nf4Tensor { shape, blocksize, packed, absmax })
}
