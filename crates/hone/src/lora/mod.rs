//! LoRA: adapters on any frozen linear, their configuration and initialisation, PEFT's files,
//! and merging.

pub mod config;
pub mod linear;
pub mod peft;

pub use config::{LoraConfig, Targets};
pub use linear::{Lora, LoraLinear};
