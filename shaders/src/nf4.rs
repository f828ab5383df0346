//! NF4 dequantization: `out[i] = code[q_i] * absmax[i / blocksize]`, one thread per value.
//! The codes arrive as i32 words holding bitsandbytes' packed bytes little-endian; value `2j`
//! is the high nibble of byte `j`. A single f32 multiply per value, so the result is exactly
//! bitsandbytes' on every device.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

#[cube(launch_unchecked)]
fn nf4_dequantize_kernel(words: &Array<i32>, absmax: &Array<f32>, code: &Array<f32>, out: &mut Array<f32>, #[comptime] blocksize: usize) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let k = i % 8;
        // High nibble (shift 4) for even k, low for odd, within byte k / 2.
        let shift = (k / 2) * 8 + (1 - k % 2) * 4;
        let q = (words[i / 8] >> (shift as i32)) & 15;
        out[i] = code[q as usize] * absmax[i / blocksize];
    }
}

/// Dequantizes `[out_features, in_features]` from its words (i32, `ceil(n / 8)`) and f32
/// absmax (one per block). Both inputs must be contiguous f32 / i32 device tensors.
pub fn nf4_dequantize<R: CubeRuntime>(
    words: CubeTensor<R>,
    absmax: CubeTensor<R>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
) -> CubeTensor<R> {
    const CODE: [f32; 16] = [
        -1.0, -0.696_192_8, -0.525_073_05, -0.394_917_5, -0.284_441_38, -0.184_773_43, -0.091_050_036, 0.0,
        0.079_580_3, 0.160_930_2, 0.246_112_3, 0.337_915_24, 0.440_709_83, 0.562_617, 0.722_956_84, 1.0,
    ];
    let client = words.client.clone();
    let n = out_features * in_features;
    let code_bytes: Vec<u8> = CODE.iter().flat_map(|c| c.to_le_bytes()).collect();
    let code = client.create_from_slice(&code_bytes);
    let output = client.empty(n * core::mem::size_of::<f32>());
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    let n_words = words.handle.size() as usize / 4;
    let n_blocks = absmax.handle.size() as usize / 4;
    unsafe {
        nf4_dequantize_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(words.handle.clone(), n_words),
            ArrayArg::from_raw_parts(absmax.handle.clone(), n_blocks),
            ArrayArg::from_raw_parts(code, 16),
            ArrayArg::from_raw_parts(output.clone(), n),
            blocksize,
        )
    };
    CubeTensor::new_contiguous(client, words.device.clone(), Shape::new([out_features, in_features]), output, DType::F32)
}
