//! One AdamW update per parameter in a single kernel, one thread per value, in the order of
//! operations of hone's tensor-op version (`hone::ops::reference::adamw`, which follows
//! `torch.optim.AdamW`). The tensor-op version is a dozen launches per parameter; with a few
//! dozen LoRA tensors that was a third of the dispatches of a step in the browser.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn adamw_kernel<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    exp_avg: &Array<F>,
    exp_avg_sq: &Array<F>,
    param_out: &mut Array<F>,
    exp_avg_out: &mut Array<F>,
    exp_avg_sq_out: &mut Array<F>,
    scalars: &Array<F>,
) {
    let i = ABSOLUTE_POS;
    if i < param_out.len() {
        let g = grad[i];
        let m = exp_avg[i] + (g - exp_avg[i]) * scalars[1];
        let v = exp_avg_sq[i] * scalars[2] + g * g * scalars[3];
        exp_avg_out[i] = m;
        exp_avg_sq_out[i] = v;
        param_out[i] = param[i] * scalars[0] - m / (v.sqrt() / scalars[4] + scalars[5]) * scalars[6];
    }
}

/// `[param, exp_avg, exp_avg_sq]` after one update. Inputs: contiguous f32 tensors of one
/// shape. `scalars`: decay, 1 − β₁, β₂, 1 − β₂, √(bias correction 2), ε, step size.
pub fn adamw<R: CubeRuntime>(param: CubeTensor<R>, grad: CubeTensor<R>, exp_avg: CubeTensor<R>, exp_avg_sq: CubeTensor<R>, scalars: [f32; 7]) -> [CubeTensor<R>; 3] {
    let client = param.client.clone();
    let shape: Shape = param.meta.shape().clone();
    let n = shape.num_elements();
    let bytes: Vec<u8> = scalars.iter().flat_map(|c| c.to_le_bytes()).collect();
    let scalars = client.create_from_slice(&bytes);
    let outputs: [_; 3] = std::array::from_fn(|_| client.empty(n * core::mem::size_of::<f32>()));
    let cube_dim = CubeDim::new(&client, n);
    let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
    // SAFETY (for each use): the handle holds n f32 values.
    let arg = |h: &cubecl::server::Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), n) };
    unsafe {
        adamw_kernel::launch_unchecked::<f32, R>(
            &client,
            cube_count,
            cube_dim,
            arg(&param.handle),
            arg(&grad.handle),
            arg(&exp_avg.handle),
            arg(&exp_avg_sq.handle),
            arg(&outputs[0]),
            arg(&outputs[1]),
            arg(&outputs[2]),
            ArrayArg::from_raw_parts(scalars, 7),
        )
    };
    outputs.map(|h| CubeTensor::new_contiguous(client.clone(), param.device.clone(), shape.clone(), h, DType::F32))
}
