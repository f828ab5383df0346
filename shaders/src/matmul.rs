//! A matrix product for GPUs that are CPUs underneath (SwiftShader in the browser, lavapipe):
//! each thread keeps a 4×4 tile of the output in registers and walks k, reading both operands
//! through their strides. No shared memory and no barriers: a software Vulkan runs a workgroup's
//! threads as SIMD lanes and turns every barrier into a coroutine switch, which made burn's
//! tiled matmul (stage through shared memory, sync, multiply) 89% of a training step's kernel
//! time on SwiftShader and 3.6x slower there than on lavapipe. Strided operands also spare the
//! copies a transposed view would otherwise cost (`x·Wᵀ` reads W `[out, in]` as it is stored).

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// Rows and columns of the output tile each thread computes.
const TILE: usize = 4;

/// `out[z, i, j] = Σ_p a[z, i, p] · b[z, p, j]` for `z < batch`, where operand element
/// `(z, i, p)` sits at `(z / inner)·s0 + (z % inner)·s1 + i·rs + p·cs` (two batch dimensions
/// with their own strides, so a broadcast is a zero stride). `out` is contiguous `[batch, m, n]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn matmul_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    out: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    inner: u32,
    a_s0: u32,
    a_s1: u32,
    a_rs: u32,
    a_cs: u32,
    b_s0: u32,
    b_s1: u32,
    b_rs: u32,
    b_cs: u32,
    #[comptime] tile: usize,
) {
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let (batch, inner) = (batch as usize, inner as usize);
    let tiles_n = n.div_ceil(tile);
    let tiles_m = m.div_ceil(tile);
    let id = ABSOLUTE_POS;
    let tj = id % tiles_n;
    let rest = id / tiles_n;
    let ti = rest % tiles_m;
    let z = rest / tiles_m;
    if z < batch {
        let a_base = (z / inner) * (a_s0 as usize) + (z % inner) * (a_s1 as usize);
        let b_base = (z / inner) * (b_s0 as usize) + (z % inner) * (b_s1 as usize);
        let (a_rs, a_cs, b_rs, b_cs) = (a_rs as usize, a_cs as usize, b_rs as usize, b_cs as usize);
        // Rows and columns past the edge read the last valid one (always in bounds); their
        // results are not stored.
        let mut rows = Array::<usize>::new(tile);
        let mut cols = Array::<usize>::new(tile);
        #[unroll]
        for r in 0usize..tile {
            let i = ti * tile + r;
            let j = tj * tile + r;
            rows[r] = a_base + select(i < m, i, m - 1usize) * a_rs;
            cols[r] = b_base + select(j < n, j, n - 1usize) * b_cs;
        }
        let mut acc = Array::<F>::new(tile * tile);
        #[unroll]
        for t in 0usize..tile * tile {
            acc[t] = F::new(0.0);
        }
        let mut av = Array::<F>::new(tile);
        let mut bv = Array::<F>::new(tile);
        for p in 0usize..k {
            #[unroll]
            for r in 0usize..tile {
                av[r] = a[rows[r] + p * a_cs];
                bv[r] = b[cols[r] + p * b_rs];
            }
            #[unroll]
            for r in 0usize..tile {
                #[unroll]
                for c in 0usize..tile {
                    acc[r * tile + c] += av[r] * bv[c];
                }
            }
        }
        let out_base = z * m * n;
        #[unroll]
        for r in 0usize..tile {
            let i = ti * tile + r;
            #[unroll]
            for c in 0usize..tile {
                let j = tj * tile + c;
                if i < m && j < n {
                    out[out_base + i * n + j] = acc[r * tile + c];
                }
            }
        }
    }
}

/// One operand's view: the strides of its two batch dimensions, then of its rows and columns.
type Strides = [usize; 4];

/// The sizes of the two batch dimensions in front of the matrix (outer, inner; size 1 and
/// stride 0 where the rank leaves one out) and the strides `[outer, inner, row, column]`.
fn layout(shape: &[usize], strides: &[usize]) -> ([usize; 2], Strides) {
    let r = shape.len();
    let batch = |d: usize| if d + r >= 4 { (shape[d + r - 4], strides[d + r - 4]) } else { (1, 0) };
    let (outer, inner) = (batch(0), batch(1));
    ([outer.0, inner.0], [outer.1, inner.1, strides[r - 2], strides[r - 1]])
}

/// `a · b` for f32 tensors `[.., m, k]` and `[.., k, n]` of rank 2 to 4, any strides; batch
/// dimensions broadcast where one side has size 1. Returns a contiguous `[.., m, n]`.
pub fn matmul<R: CubeRuntime>(a: CubeTensor<R>, b: CubeTensor<R>) -> CubeTensor<R> {
    let (sa, sb) = (a.meta.shape().to_vec(), b.meta.shape().to_vec());
    let rank = sa.len();
    assert!(rank == sb.len() && (2..=4).contains(&rank), "matmul of ranks {} and {}", rank, sb.len());
    let (m, k, n) = (sa[rank - 2], sa[rank - 1], sb[rank - 1]);
    assert_eq!(k, sb[rank - 2], "matmul of [.., {m}, {k}] and [.., {}, {n}]", sb[rank - 2]);
    let (da, mut la) = layout(&sa, a.meta.strides());
    let (db, mut lb) = layout(&sb, b.meta.strides());
    let mut batch_dims = [1usize; 2];
    for d in 0..2 {
        batch_dims[d] = da[d].max(db[d]);
        if da[d] == 1 {
            la[d] = 0;
        }
        if db[d] == 1 {
            lb[d] = 0;
        }
        assert!(da[d] == db[d] || da[d] == 1 || db[d] == 1, "matmul batch dimensions {sa:?} and {sb:?}");
    }
    let batch = batch_dims[0] * batch_dims[1];
    let mut out_shape: Vec<usize> = sa.iter().zip(&sb).map(|(x, y)| *x.max(y)).collect();
    out_shape[rank - 2] = m;
    out_shape[rank - 1] = n;
    let client = a.client.clone();
    let output = client.empty(batch * m * n * core::mem::size_of::<f32>());
    let out = CubeTensor::new_contiguous(client.clone(), a.device.clone(), Shape::from(out_shape), output.clone(), DType::F32);
    if batch * m * n == 0 {
        return out;
    }
    let threads = batch * m.div_ceil(TILE) * n.div_ceil(TILE);
    let cube_dim = CubeDim::new_1d(64);
    let cube_count = cubecl::calculate_cube_count_elemwise(&client, threads, cube_dim);
    let u = |v: usize| u32::try_from(v).expect("matmul sizes and strides fit in u32");
    let len = |t: &CubeTensor<R>| t.handle.size() as usize / core::mem::size_of::<f32>();
    // SAFETY: every index the kernel reads is clamped to a valid element of its view, and the
    // output holds batch·m·n values.
    unsafe {
        matmul_kernel::launch_unchecked::<f32, R>(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(a.handle.clone(), len(&a)),
            ArrayArg::from_raw_parts(b.handle.clone(), len(&b)),
            ArrayArg::from_raw_parts(output, batch * m * n),
            u(m),
            u(n),
            u(k),
            u(batch),
            u(batch_dims[1]),
            u(la[0]),
            u(la[1]),
            u(la[2]),
            u(la[3]),
            u(lb[0]),
            u(lb[1]),
            u(lb[2]),
            u(lb[3]),
            TILE,
        )
    };
    out
}
