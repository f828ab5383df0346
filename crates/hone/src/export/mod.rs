//! Adapters for other runtimes: a llama.cpp LoRA adapter GGUF ([`gguf_lora`]), a merged model
//! as GGUF from a GGUF base ([`gguf_merge`]) or from a Hugging Face one ([`gguf_hf`], its
//! tokenizer from [`gguf_vocab`]), and what vLLM,
//! llama.cpp or PEFT will refuse or read differently in an adapter ([`check`]).
//! Above `lora` and `model` (it needs both the adapter and the base's architecture).

pub mod check;
#[cfg(not(target_arch = "wasm32"))]
pub mod gguf_hf;
pub mod gguf_lora;
#[cfg(not(target_arch = "wasm32"))]
pub mod gguf_merge;
pub mod gguf_vocab;
