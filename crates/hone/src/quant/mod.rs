//! Frozen, quantized base weights. Knows nothing of LoRA.

pub mod bnb;
pub mod dynamic_map;
pub mod frozen;
pub mod nf4;
#[cfg(not(target_arch = "wasm32"))]
pub mod nf4_gemm;
pub mod torch_sum;

pub use frozen::{FrozenWeight, HoneBackend, Nf4Weight};
pub use nf4::{NestedAbsmax, Nf4Tensor};
