//! The text encoder of the Wan pipelines (reference §3): prompt cleaning, the UMT5 tokenizer and
//! the UMT5 encoder, giving `[B, 512, d_model]` prompt embeddings that are zero past each prompt.

mod clean;
mod config;
mod ftfy;
mod html;
mod prompt;
mod relative;
mod tokenizer;
mod umt5;

pub use clean::{basic_clean, prompt_clean, whitespace_clean};
pub use config::Umt5Config;
pub use ftfy::fix_text;
pub use html::html_unescape;
pub use prompt::TextEncoder;
pub use tokenizer::{PromptTokenizer, TokenizedPrompts, TEXT_LEN};
pub use umt5::Umt5EncoderModel;
