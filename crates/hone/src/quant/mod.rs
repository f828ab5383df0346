//! Frozen, quantized base weights. Knows nothing of LoRA.

pub mod dynamic_map;
pub mod nf4;
pub mod torch_sum;

pub use nf4::{Nf4Tensor, NestedAbsmax};
