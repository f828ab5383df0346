//! SwiGLU, `silu(gate) · up`, and its backward, each one kernel (burn's tensor ops take seven
//! launches forward and ten backward, its sigmoid alone being five). One thread per value.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

#[cube(launch_unchecked)]
fn swiglu_kernel<F: Float>(gate: &Array<F>, up: &Array<F>, out: &mut Array<F>) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let g = gate[i];
        out[i] = g / (F::new(1.0) + (-g).exp()) * up[i];
    }
}

#[cube(launch_unchecked)]
fn swiglu_backward_kernel<F: Float>(gate: &Array<F>, up: &Array<F>, dy: &Array<F>, dgate: &mut Array<F>, dup: &mut Array<F>) {
    let i = ABSOLUTE_POS;
    if i < dgate.len() {
        let g = gate[i];
        let s = F::new(1.0) / (F::new(1.0) + (-g).exp());
        dgate[i] = dy[i] * up[i] * s * (F::new(1.0) + g * (F::new(1.0) - s));
        dup[i] = dy[i] * g * s;
    }
}

fn launch_shape<R: CubeRuntime>(t: &CubeTensor<R>) -> (Shape, usize, CubeDim, CubeCount) {
    let shape: Shape = t.meta.shape().clone();
    let n = shape.num_elements();
    let cube_dim = CubeDim::new(&t.client, n);
    let cube_count = calculate_cube_count_elemwise(&t.client, n, cube_dim);
    (shape, n, cube_dim, cube_count)
}

/// `silu(gate) · up` for contiguous f32 tensors of one shape.
pub fn swiglu<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let client = gate.client.clone();
    let (shape, n, cube_dim, cube_count) = launch_shape(&gate);
    let out = client.empty(n * core::mem::size_of::<f32>());
    unsafe {
        swiglu_kernel::launch_unchecked::<f32, R>(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(gate.handle.clone(), n),
            ArrayArg::from_raw_parts(up.handle.clone(), n),
            ArrayArg::from_raw_parts(out.clone(), n),
        )
    };
    CubeTensor::new_contiguous(client, gate.device.clone(), shape, out, DType::F32)
}

/// `[d gate, d up]` given `dy`, for contiguous f32 tensors of one shape.
pub fn swiglu_backward<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>, dy: CubeTensor<R>) -> [CubeTensor<R>; 2] {
    let client = gate.client.clone();
    let (shape, n, cube_dim, cube_count) = launch_shape(&gate);
    let outs: [_; 2] = std::array::from_fn(|_| client.empty(n * core::mem::size_of::<f32>()));
    unsafe {
        swiglu_backward_kernel::launch_unchecked::<f32, R>(
            &client,
            cube_count,
            cube_dim,
            ArrayArg::from_raw_parts(gate.handle.clone(), n),
            ArrayArg::from_raw_parts(up.handle.clone(), n),
            ArrayArg::from_raw_parts(dy.handle.clone(), n),
            ArrayArg::from_raw_parts(outs[0].clone(), n),
            ArrayArg::from_raw_parts(outs[1].clone(), n),
        )
    };
    outs.map(|h| CubeTensor::new_contiguous(client.clone(), gate.device.clone(), shape.clone(), h, DType::F32))
}
