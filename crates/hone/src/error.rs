//! One error type for the core. Every variant that concerns bad input carries the file (and,
//! where there is one, the tensor) so that a user can find what to fix.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading bytes failed (file missing, short read, Blob error).
    #[error("{file}: {message}")]
    Io { file: String, message: String },

    /// A file's content does not parse or is inconsistent (JSON, safetensors header, ...).
    #[error("{file}: {message}")]
    Format { file: String, message: String },

    /// A tensor is wrong: missing, wrong shape, wrong dtype, out of bounds.
    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor { file: String, tensor: String, message: String },

    /// The configuration asks for something hone does not do.
    #[error("{file}: {message}")]
    Unsupported { file: String, message: String },

    /// The tokenizer failed to load or encode.
    #[error("{file}: tokenizer: {message}")]
    Tokenizer { file: String, message: String },

    /// Data-parallel peers could not meet or sum: the message names the peer (and node) lost.
    #[error("data parallel: {message}")]
    Peers { message: String },

    /// A backend (GPU driver, CUDA library) could not be used.
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(file: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Io { file: file.to_string(), message: message.to_string() }
    }
    pub fn format(file: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Format { file: file.to_string(), message: message.to_string() }
    }
    pub fn tensor(file: impl fmt::Display, tensor: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Tensor { file: file.to_string(), tensor: tensor.to_string(), message: message.to_string() }
    }
    pub fn unsupported(file: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::Unsupported { file: file.to_string(), message: message.to_string() }
    }
}
