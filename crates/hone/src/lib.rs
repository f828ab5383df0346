//! hone's core: model loading and the decoder, generic over burn's `Backend`; native and wasm32.
//!
//! Layers, bottom up: `io` (byte sources, safetensors, GGUF), `readback` and `data` (formats,
//! templates) → `quant` (NF4) → `lora` and `model` → `train`, `generate`, `export` → `compare` (base vs adapters on
//! held-out data).

pub mod compare;
pub mod data;
pub mod error;
pub mod export;
pub mod generate;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod parity;
pub mod quant;
pub mod readback;
pub mod score;
pub mod train;

pub use error::{Error, Result};
