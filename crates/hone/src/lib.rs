//! hone's core: model loading and the decoder, generic over burn's `Backend`; native and wasm32.
//!
//! Layers, bottom up: `io` (byte sources, safetensors) and `data` (tokenizer) → `model`.

pub mod data;
pub mod error;
pub mod generate;
pub mod io;
pub mod lora;
pub mod model;
pub mod parity;
pub mod quant;
pub mod train;

pub use error::{Error, Result};
