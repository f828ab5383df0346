//! Comparing hone's numbers with a reference (transformers, PEFT, bitsandbytes), the way the
//! tests and `hone logits` users do: ‖ours − ref‖ / ‖ref‖ over all elements.

use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, SafeTensors};

/// Relative L2 error of `ours` against `reference`; infinite when lengths differ or a value is
/// not finite, so a broken result can never pass.
pub fn rel_error(ours: &[f32], reference: &[f32]) -> f64 {
    if ours.len() != reference.len() || ours.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in ours.iter().zip(reference) {
        diff += (*a as f64 - *b as f64).powi(2);
        norm += (*b as f64).powi(2);
    }
    if norm == 0.0 {
        return if diff == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (diff / norm).sqrt()
}

/// An I64 tensor (token ids in fixtures) as u32.
pub fn read_ids(st: &SafeTensors, name: &str) -> Result<Vec<u32>> {
    let (info, bytes) = st.read_raw(name)?;
    if info.dtype != Dtype::I64 {
        return Err(Error::tensor(st.name(), name, "expected I64 token ids"));
    }
    Ok(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect())
}

/// Checks `tok` against a fixture list of `{"text", "ids"}` made with Python `tokenizers`
/// (special tokens added). Returns how many cases matched, or the first mismatch.
pub fn check_token_ids(tok: &crate::data::Tokenizer, cases_json: &[u8]) -> std::result::Result<usize, String> {
    let cases: serde_json::Value = serde_json::from_slice(cases_json).map_err(|e| e.to_string())?;
    let cases = cases.as_array().ok_or("cases are not a list")?;
    for case in cases {
        let text = case["text"].as_str().ok_or("case without text")?;
        let want: Vec<u32> = case["ids"].as_array().ok_or("case without ids")?.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect();
        let got = tok.encode(text, true).map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!("ids for {text:?}: hone {got:?}, tokenizers {want:?}"));
        }
    }
    Ok(cases.len())
}
