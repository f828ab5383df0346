//! Text in: tokenizers (and, later, datasets and chat templates).

pub mod tokenizer;
pub use tokenizer::Tokenizer;
