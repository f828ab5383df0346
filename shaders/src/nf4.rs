//! NF4 dequantization: `out[i] = code[q_i] * absmax[i / blocksize]`, one thread per value.
//! The codes arrive as i32 words holding bitsandbytes' packed bytes little-endian; value `2j`
//! is the high nibble of byte `j`. The absmax is an f32 per block, or bitsandbytes' double
//! quantization of it, expanded here in bitsandbytes' order: `dynamic_map[c] · scale`, then
//! `+ offset`, each rounded to f32; then a single f32 multiply per value, so the result is
//! exactly bitsandbytes' on every device.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// NF4's 16 code values (bitsandbytes' table).
pub const CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Blocks per nested scale in double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The absmax of an NF4 weight as the kernels take it.
pub enum Absmax<R: CubeRuntime> {
    /// One f32 per block.
    Plain(CubeTensor<R>),
    /// One 8-bit code per block, 4 per i32 word; f32 scales, one per 256 blocks, then the
    /// offset; and the 256-entry signed dynamic map the codes index.
    Nested {
        codes: CubeTensor<R>,
        scales: CubeTensor<R>,
        table: [f32; 256],
    },
}

/// The absmax of `block`: `absmax[block]`, or the double-quantized expansion.
#[cube]
pub fn block_absmax(
    absmax: &Array<f32>,
    codes: &Array<i32>,
    table: &Array<f32>,
    block: usize,
    #[comptime] nested: bool,
) -> f32 {
    if comptime![nested] {
        let c = (codes[block / 4] >> ((block % 4) * 8) as i32) & 255;
        let scaled = table[c as usize] * absmax[block / 256usize];
        scaled + absmax[absmax.len() - 1]
    } else {
        absmax[block]
    }
}

#[cube(launch_unchecked)]
fn nf4_dequantize_kernel(
    words: &Array<i32>,
    absmax: &Array<f32>,
    codes: &Array<i32>,
    table: &Array<f32>,
    code: &Array<f32>,
    out: &mut Array<f32>,
    #[comptime] blocksize: usize,
    #[comptime] nested: bool,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        out[i] = code[nibble(words, i) as usize] * block_absmax(absmax, codes, table, i / blocksize, nested);
    }
}

/// NF4 code `i` (a flat index into W) from its word: value `2j` is the high nibble of byte `j`.
#[cube]
pub fn nibble(words: &Array<i32>, i: usize) -> u32 {
    let k = i % 8;
    let shift = (k / 2) * 8 + (1 - k % 2) * 4;
    u32::cast_from((words[i / 8] >> (shift as i32)) & 15)
}

/// The arrays every NF4 kernel takes for the absmax: (f32 values or scales, codes, table). The
/// unused ones of the plain form are one-element stand-ins.
pub(crate) fn absmax_args<R: CubeRuntime>(
    client: &ComputeClient<R>,
    absmax: &Absmax<R>,
) -> ([cubecl::server::Handle; 3], [usize; 3], bool) {
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|c| c.to_le_bytes()).collect::<Vec<u8>>();
    match absmax {
        Absmax::Plain(a) => {
            let stand_in = client.create_from_slice(&[0u8; 4]);
            (
                [a.handle.clone(), stand_in.clone(), stand_in],
                [a.meta.shape().num_elements(), 1, 1],
                false,
            )
        }
        Absmax::Nested {
            codes,
            scales,
            table,
        } => {
            let table = client.create_from_slice(&f32_bytes(table));
            (
                [scales.handle.clone(), codes.handle.clone(), table],
                [
                    scales.meta.shape().num_elements(),
                    codes.meta.shape().num_elements(),
                    256,
                ],
                true,
            )
        }
    }
}

/// Dequantizes `[out_features, in_features]` from its words (i32, `ceil(n / 8)`) and absmax.
/// Every input must be a contiguous device tensor.
pub fn nf4_dequantize<R: CubeRuntime>(
    words: CubeTensor<R>,
    absmax: Absmax<R>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
) -> CubeTensor<R> {
    let client = words.client.clone();
    let n = out_features * in_features;
    let code_bytes: Vec<u8> = CODE.iter().flat_map(|c| c.to_le_bytes()).collect();
    let code = client.create_from_slice(&code_bytes);
    let output = client.empty(n * core::mem::size_of::<f32>());
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    let n_words = words.meta.shape().num_elements();
    let ([a, c, t], [na, nc, nt], nested) = absmax_args(&client, &absmax);
    unsafe {
        nf4_dequantize_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(words.handle.clone(), n_words),
            ArrayArg::from_raw_parts(a, na),
            ArrayArg::from_raw_parts(c, nc),
            ArrayArg::from_raw_parts(t, nt),
            ArrayArg::from_raw_parts(code, 16),
            ArrayArg::from_raw_parts(output.clone(), n),
            blocksize,
            nested,
        )
    };
    CubeTensor::new_contiguous(
        client,
        words.device.clone(),
        Shape::new([out_features, in_features]),
        output,
        DType::F32,
    )
}
