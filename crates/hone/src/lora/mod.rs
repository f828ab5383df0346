//! LoRA and DoRA: adapters on any frozen linear, their configuration and initialisation (PEFT's
//! default, PiSSA and LoftQ, `init`), PEFT's files, and merging.

pub mod config;
pub mod init;
pub mod linear;
#[cfg(not(target_arch = "wasm32"))]
pub mod merge;
pub mod peft;

pub use config::{LoraConfig, Targets};
pub use linear::{Lora, LoraLinear};
