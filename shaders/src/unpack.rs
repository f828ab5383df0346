//! Frozen tensors kept in the checkpoint's precision, unpacked to f32: the values' bits arrive
//! in i32 words (f32: one per word; bf16 and f16: two, the first in the low half). WGSL has no
//! 16-bit types without `shader-f16`, so the halves are taken apart with integer ops: bf16 is
//! the top half of an f32; f16 is rebuilt from its sign, exponent and mantissa (subnormals,
//! infinities and NaN included). One thread per value.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// How the words hold values: the `per_word` and 16-bit kind of hone's `StoredFloat`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    F32,
    BF16,
    F16,
}

/// The f32 bits of the f16 in the low 16 bits of `h`.
#[cube]
fn f16_bits(h: u32) -> u32 {
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let mant = h & 0x3ff;
    let mut bits = sign | ((exp + 112) << 23) | (mant << 13);
    if exp == 0 {
        // Zero or subnormal: mant · 2⁻²⁴, exact in f32.
        let v = f32::cast_from(mant) * 5.960_464_5e-8;
        bits = sign | u32::reinterpret(v);
    }
    if exp == 31 {
        bits = sign | 0x7f80_0000 | (mant << 13);
    }
    bits
}

#[cube(launch_unchecked)]
fn unpack_kernel(words: &Array<i32>, out: &mut Array<f32>, #[comptime] format: u32) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        if comptime![format == 0] {
            out[i] = f32::reinterpret(words[i]);
        } else {
            let w = u32::reinterpret(words[i / 2]);
            let h = select(i % 2 == 0, w & 0xffff, w >> 16);
            if comptime![format == 1] {
                out[i] = f32::reinterpret(h << 16);
            } else {
                out[i] = f32::reinterpret(f16_bits(h));
            }
        }
    }
}

/// The f32 values of `words` (a contiguous i32 device tensor), `[words · per_word]`.
pub fn unpack<R: CubeRuntime>(words: CubeTensor<R>, format: Format) -> CubeTensor<R> {
    let client = words.client.clone();
    let n_words = words.meta.shape().num_elements();
    let per_word = if format == Format::F32 { 1 } else { 2 };
    let n = n_words * per_word;
    let output = client.empty(n * core::mem::size_of::<f32>());
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    let code = match format {
        Format::F32 => 0,
        Format::BF16 => 1,
        Format::F16 => 2,
    };
    unsafe {
        unpack_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(words.handle.clone(), n_words),
            ArrayArg::from_raw_parts(output.clone(), n),
            code,
        )
    };
    CubeTensor::new_contiguous(
        client,
        words.device.clone(),
        Shape::new([n]),
        output,
        DType::F32,
    )
}
