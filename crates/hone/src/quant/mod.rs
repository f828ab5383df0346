//! Frozen, quantized base weights. Knows nothing of LoRA.

pub mod bnb;
pub mod dynamic_map;
pub mod frozen;
pub mod nf4;
pub mod torch_sum;

pub use frozen::{FrozenWeight, Nf4Weight};
pub use nf4::{NestedAbsmax, Nf4Tensor};
