//! The text encoder of the Wan pipelines (reference §3): prompt cleaning, the UMT5 tokenizer and
//! the UMT5 encoder, giving `[B, 512, d_model]` prompt embeddings that are zero past each prompt.

mod config;
mod relative;
mod umt5;

pub use config::Umt5Config;
pub use relative::relative_position_bucket;
pub use umt5::Umt5EncoderModel;
