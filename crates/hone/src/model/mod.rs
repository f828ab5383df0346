//! Decoder-only transformers: config, RoPE, the decoder, and loading weights into it (PiSSA's
//! residual base and LoftQ's start are made by a source wrapped around the loader's, `init_source`).

pub mod config;
pub mod decoder;
pub mod gguf;
pub mod init_source;
pub mod load;
pub mod placement;
#[cfg(not(target_arch = "wasm32"))]
pub mod quantize;
pub mod rope;
pub mod text;

pub use config::{Arch, Config, Rope};
pub use decoder::CausalLm;
pub use text::ModelText;
pub use load::{load_model, load_model_with, LoadOptions, Nf4Options};
pub use placement::Placement;
