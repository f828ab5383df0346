//! Adapters for other runtimes: a llama.cpp LoRA adapter GGUF ([`gguf_lora`]), a merged model
//! as GGUF ([`gguf_merge`]), and what vLLM,
//! llama.cpp or PEFT will refuse or read differently in an adapter ([`check`]).
//! Above `lora` and `model` (it needs both the adapter and the base's architecture).

pub mod check;
pub mod gguf_lora;
#[cfg(not(target_arch = "wasm32"))]
pub mod gguf_merge;
