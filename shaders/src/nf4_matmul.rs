//! A frozen NF4 linear's two products with the weight decoded inside them, never stored dense:
//! the forward `y = x·Wᵀ` and the backward `dx = dy·W`, W `[n, k]` as bitsandbytes packs it
//! (see `nf4.rs`). Each thread keeps a 4×4 tile of the output in registers, as `matmul.rs`
//! does; a weight value is decoded once per tile, from its word and its block's absmax (the
//! double-quantized form expanded in bitsandbytes' order), so the values multiplied are exactly
//! the dequantized weight's. QLoRA's point is that the dense weight never exists: with these
//! kernels not even as a transient workspace.

use crate::nf4::{absmax_args, block_absmax, nibble, Absmax, CODE};
use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// Rows and columns of the output tile each thread computes.
const TILE: usize = 4;

/// `out[i, j] = Σ_p x[i, p] · W[j, p]` for x `[m, k]` contiguous, W `[n, k]` in NF4; `out` `[m, n]`.
/// Eight p at a time: one word of W's row `j` holds them, in one absmax block (k and the block
/// size are multiples of 8).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn nf4_matmul_t_kernel(
    x: &Array<f32>,
    words: &Array<i32>,
    absmax: &Array<f32>,
    codes: &Array<i32>,
    table: &Array<f32>,
    code: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] blocksize: usize,
    #[comptime] nested: bool,
) {
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let tiles_n = n.div_ceil(TILE);
    let ti = ABSOLUTE_POS / tiles_n;
    let tj = ABSOLUTE_POS % tiles_n;
    if ti * TILE < m {
        // Rows past the edge read the last valid one; their results are not stored.
        let mut rows = Array::<usize>::new(TILE);
        let mut wrows = Array::<usize>::new(TILE);
        #[unroll]
        for r in 0usize..TILE {
            let i = ti * TILE + r;
            let j = tj * TILE + r;
            rows[r] = select(i < m, i, m - 1usize) * k;
            wrows[r] = select(j < n, j, n - 1usize) * k;
        }
        let mut acc = Array::<f32>::new(TILE * TILE);
        #[unroll]
        for t in 0usize..TILE * TILE {
            acc[t] = 0.0;
        }
        let mut wv = Array::<f32>::new(TILE * 8);
        for g in 0usize..k / 8 {
            let p0 = g * 8;
            #[unroll]
            for c in 0usize..TILE {
                let at = wrows[c] + p0;
                let scale = block_absmax(absmax, codes, table, at / blocksize, nested);
                #[unroll]
                for q in 0usize..8 {
                    wv[c * 8 + q] = code[nibble(words, at + q) as usize] * scale;
                }
            }
            #[unroll]
            for q in 0usize..8 {
                #[unroll]
                for r in 0usize..TILE {
                    let xv = x[rows[r] + p0 + q];
                    #[unroll]
                    for c in 0usize..TILE {
                        acc[r * TILE + c] += xv * wv[c * 8 + q];
                    }
                }
            }
        }
        #[unroll]
        for r in 0usize..TILE {
            let i = ti * TILE + r;
            #[unroll]
            for c in 0usize..TILE {
                let j = tj * TILE + c;
                if i < m && j < n {
                    out[i * n + j] = acc[r * TILE + c];
                }
            }
        }
    }
}

/// `out[i, j] = Σ_p dy[i, p] · W[p, j]` for dy `[m, n]` contiguous, W `[n, k]` in NF4; `out`
/// `[m, k]`. A tile's 4 columns of W lie in one word and one absmax block (k is a multiple of 8).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn nf4_matmul_kernel(
    dy: &Array<f32>,
    words: &Array<i32>,
    absmax: &Array<f32>,
    codes: &Array<i32>,
    table: &Array<f32>,
    code: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] blocksize: usize,
    #[comptime] nested: bool,
) {
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let tiles_k = k / TILE;
    let ti = ABSOLUTE_POS / tiles_k;
    let j0 = (ABSOLUTE_POS % tiles_k) * TILE;
    if ti * TILE < m {
        let mut rows = Array::<usize>::new(TILE);
        #[unroll]
        for r in 0usize..TILE {
            let i = ti * TILE + r;
            rows[r] = select(i < m, i, m - 1usize) * n;
        }
        let mut acc = Array::<f32>::new(TILE * TILE);
        #[unroll]
        for t in 0usize..TILE * TILE {
            acc[t] = 0.0;
        }
        let mut wv = Array::<f32>::new(TILE);
        for p in 0usize..n {
            let at = p * k + j0;
            let scale = block_absmax(absmax, codes, table, at / blocksize, nested);
            #[unroll]
            for c in 0usize..TILE {
                wv[c] = code[nibble(words, at + c) as usize] * scale;
            }
            #[unroll]
            for r in 0usize..TILE {
                let g = dy[rows[r] + p];
                #[unroll]
                for c in 0usize..TILE {
                    acc[r * TILE + c] += g * wv[c];
                }
            }
        }
        #[unroll]
        for r in 0usize..TILE {
            let i = ti * TILE + r;
            if i < m {
                #[unroll]
                for c in 0usize..TILE {
                    out[i * k + j0 + c] = acc[r * TILE + c];
                }
            }
        }
    }
}

/// Whether the fused products take a weight of these sizes: rows in whole words, blocks of
/// whole words.
pub fn supported(in_features: usize, blocksize: usize) -> bool {
    in_features % 8 == 0 && blocksize % 8 == 0
}

fn launch<R: CubeRuntime>(
    forward: bool,
    a: CubeTensor<R>,
    words: CubeTensor<R>,
    absmax: Absmax<R>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
) -> CubeTensor<R> {
    assert!(
        supported(in_features, blocksize),
        "fused NF4 product of a [{out_features}, {in_features}] weight in blocks of {blocksize}"
    );
    let client = a.client.clone();
    let m = a.meta.shape().num_elements() / if forward { in_features } else { out_features };
    let (cols, threads) = if forward {
        (out_features, m.div_ceil(TILE) * out_features.div_ceil(TILE))
    } else {
        (in_features, m.div_ceil(TILE) * in_features / TILE)
    };
    let output = client.empty(m * cols * core::mem::size_of::<f32>());
    let out = CubeTensor::new_contiguous(
        client.clone(),
        a.device.clone(),
        Shape::new([m, cols]),
        output.clone(),
        DType::F32,
    );
    if m * cols == 0 {
        return out;
    }
    let code = client.create_from_slice(
        &CODE
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let ([s, c, t], [ns, nc, nt], nested) = absmax_args(&client, &absmax);
    let cube_dim = CubeDim::new_1d(64);
    let cube_count = cubecl::calculate_cube_count_elemwise(&client, threads, cube_dim);
    let u = |v: usize| u32::try_from(v).expect("NF4 product sizes fit in u32");
    let n_words = words.meta.shape().num_elements();
    // SAFETY: every index the kernels read is inside its array (rows past the edge are clamped,
    // words and blocks follow from the weight's shape), and the output holds m·cols values.
    unsafe {
        let args = (
            ArrayArg::from_raw_parts(a.handle.clone(), a.meta.shape().num_elements()),
            ArrayArg::from_raw_parts(words.handle.clone(), n_words),
            ArrayArg::from_raw_parts(s, ns),
            ArrayArg::from_raw_parts(c, nc),
            ArrayArg::from_raw_parts(t, nt),
            ArrayArg::from_raw_parts(code, 16),
            ArrayArg::from_raw_parts(output, m * cols),
        );
        if forward {
            nf4_matmul_t_kernel::launch_unchecked(
                &client,
                cube_count,
                cube_dim,
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                u(m),
                u(out_features),
                u(in_features),
                blocksize,
                nested,
            )
        } else {
            nf4_matmul_kernel::launch_unchecked(
                &client,
                cube_count,
                cube_dim,
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                u(m),
                u(out_features),
                u(in_features),
                blocksize,
                nested,
            )
        }
    }
    out
}

/// `x·Wᵀ` `[m, out]` for a contiguous f32 `x` `[m, in]` and an NF4 W `[out, in]`.
pub fn nf4_matmul_t<R: CubeRuntime>(
    x: CubeTensor<R>,
    words: CubeTensor<R>,
    absmax: Absmax<R>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
) -> CubeTensor<R> {
    launch(true, x, words, absmax, out_features, in_features, blocksize)
}

/// `dy·W` `[m, in]` for a contiguous f32 `dy` `[m, out]` and an NF4 W `[out, in]`.
pub fn nf4_matmul<R: CubeRuntime>(
    dy: CubeTensor<R>,
    words: CubeTensor<R>,
    absmax: Absmax<R>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
) -> CubeTensor<R> {
    launch(
        false,
        dy,
        words,
        absmax,
        out_features,
        in_features,
        blocksize,
    )
}
