//! bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map(signed=True)`), used to
//! quantize NF4's absmax in double quantization. Rebuilt here step by step in the same
//! precisions (f32 linspace, means and scaling), and checked against the
//! map bitsandbytes stores (tests/fixtures/nf4).

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

/// The 256 sorted code values.
pub fn signed_dynamic_map() -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, fraction_items);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        // A Python float times a float32 tensor: torch multiplies in f32.
        let scale = 10f64.powf((-(MAX_EXPONENT_BITS - 1) + i) as f64) as f32;
        data.extend(means.iter().map(|&m| (scale * m) as f64));
        data.extend(means.iter().map(|&m| (-scale * m) as f64));
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
