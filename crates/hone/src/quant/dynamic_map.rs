//! bitsandbytes' 8-bit "dynamic" maps (`create_dynamic_map`): the signed one quantizes NF4's
//! absmax in double quantization and the first moment of 8-bit AdamW, the unsigned one its
//! second moment. Rebuilt here step by step in the same precisions (f32 linspace, means and
//! scaling), and checked against the maps bitsandbytes stores (tests/fixtures/nf4,
//! tests/fixtures/optim). Also the lookup grid bitsandbytes' CPU kernel quantizes through.

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up from
/// `start`, the second half down from `end`, each value one fused multiply-add (measured: a
/// separate multiply and add differs in the last bit).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The 256 sorted code values of the signed map.
pub fn signed_dynamic_map() -> [f32; 256] {
    dynamic_map(true)
}

/// The 256 sorted code values of the unsigned map (`create_dynamic_map(signed=False)`): twice
/// the fraction items per exponent, all positive.
pub fn unsigned_dynamic_map() -> [f32; 256] {
    dynamic_map(false)
}

fn dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = (1usize << (i + if signed { 0 } else { 1 })) + 1;
        let b = linspace_f32(0.1, 1.0, fraction_items);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        // A Python float times a float32 tensor: torch multiplies in f32.
        let scale = 10f64.powf((-(MAX_EXPONENT_BITS - 1) + i) as f64) as f32;
        data.extend(means.iter().map(|&m| (scale * m) as f64));
        if signed {
            data.extend(means.iter().map(|&m| (-scale * m) as f64));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0f32; 256];
    for (o, d) in out.iter_mut().zip(&data) {
        *o = *d as f32;
    }
    out
}

/// [`signed_dynamic_map`], computed once.
pub fn dynamic_map_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(signed_dynamic_map)
}

/// Cells of the lookup grid bitsandbytes' CPU kernel quantizes 8-bit codes through.
pub const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU `quantize_blockwise` does not search for the nearest code: it rounds the
/// scaled value onto a uniform grid of [`LUT_SIZE`] cells over [-1, 1] and takes the code
/// nearest to the cell's centre (ties to the lower code), which differs from the true nearest
/// code for a few values near a midpoint. This is that grid for the sorted `code`.
pub fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    (0..LUT_SIZE)
        .map(|i| {
            let cell = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            mids.partition_point(|&m| m < cell) as u8
        })
        .collect()
}

/// The grid cell of a value already scaled into [-1, 1] (the kernel's `(v + 1)·0.5·65535 + 0.5`,
/// compiled with contraction: the last multiply and add are one fused op).
pub fn lut_cell(scaled: f32) -> usize {
    ((scaled + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as usize
}
