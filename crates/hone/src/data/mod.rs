//! Text in: tokenizers, chat templates, datasets (SFT examples and preference pairs; JSONL, CSV
//! and Parquet files through `table`).

pub mod dataset;
pub mod gguf_tokenizer;
pub mod preference;
pub mod table;
pub mod template;
mod template_fold;
pub mod tokenizer;

pub use dataset::{Example, Format, Sample};
pub use template::{ChatTemplate, Message};
pub use tokenizer::Tokenizer;
