//! Adapters in the formats other runtimes load: a llama.cpp LoRA adapter GGUF ([`gguf_lora`]).
//! Above `lora` and `model` (it needs both the adapter and the base's architecture).

pub mod gguf_lora;
