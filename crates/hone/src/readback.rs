//! Reading tensors back from the device without blocking: in the browser a synchronous read
//! panics, so everything the page needs is read through here.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

pub async fn read_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> crate::Result<Vec<f32>> {
    let err = |e: &dyn std::fmt::Debug| crate::Error::Backend { backend: "read back".into(), message: format!("{e:?}") };
    let data = t.into_data_async().await.map_err(|e| err(&e))?;
    data.to_vec::<f32>().map_err(|e| err(&e))
}

/// An integer tensor's values as i32 (hone's words are i32 on every backend).
pub async fn read_i32<B: Backend, const D: usize>(t: Tensor<B, D, burn::tensor::Int>) -> crate::Result<Vec<i32>> {
    let err = |e: &dyn std::fmt::Debug| crate::Error::Backend { backend: "read back".into(), message: format!("{e:?}") };
    let data = t.into_data_async().await.map_err(|e| err(&e))?;
    Ok(data.convert::<i32>().to_vec::<i32>().map_err(|e| err(&e))?)
}
