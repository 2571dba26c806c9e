//! The UMT5 tokenizer as the Wan pipelines call it: `tokenizer.json` (a Hugging Face fast
//! tokenizer) with `</s>` appended, truncated and padded to a fixed 512 tokens, with the
//! attention mask and each prompt's length (reference §3, step 2).

use crate::{Result, WorkerError};
use std::path::{Path, PathBuf};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// `max_sequence_length` of the Wan pipelines: every prompt becomes exactly this many tokens.
pub const TEXT_LEN: usize = 512;

/// Token ids of a batch of prompts, padded to a fixed length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompts {
    /// `[batch, max_length]`, row-major: each prompt's tokens, `</s>`, then the pad id.
    pub ids: Vec<u32>,
    /// `[batch, max_length]`: 1 for real tokens (including `</s>`), 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Real tokens per prompt (`sum(mask)`, `seq_lens` upstream).
    pub lengths: Vec<usize>,
    /// Tokens per row.
    pub max_length: usize,
}

impl TokenizedPrompts {
    /// Number of prompts.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The real tokens of prompt `i` (without padding).
    pub fn tokens(&self, i: usize) -> &[u32] {
        &self.ids[i * self.max_length..i * self.max_length + self.lengths[i]]
    }
}

/// A UMT5 tokenizer configured as the pipelines use it (`padding="max_length"`,
/// `truncation=True`, `add_special_tokens=True`).
pub struct PromptTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_length: usize,
    pad_id: u32,
}

impl PromptTokenizer {
    /// Loads a diffusers `tokenizer/` folder (its `tokenizer.json`; the pad token comes from
    /// `tokenizer_config.json` when it names one), padding and truncating to [`TEXT_LEN`].
    pub fn load(dir: &Path) -> Result<Self> {
        Self::with_max_length(dir, TEXT_LEN)
    }

    /// As [`Self::load`], with another fixed length.
    pub fn with_max_length(dir: &Path, max_length: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(WorkerError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json in the tokenizer folder"),
            });
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| WorkerError::Tokenizer { path: path.display().to_string(), detail: e.to_string() })?;
        Self::configure(inner, pad_token_of(dir)?, max_length, path)
    }

    /// A tokenizer from the contents of a `tokenizer.json` (e.g. one built into the binary);
    /// `desc` names it in errors.
    pub fn from_json_bytes(json: &[u8], pad_token: Option<&str>, max_length: usize, desc: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json).map_err(|e| WorkerError::Tokenizer { path: desc.to_string(), detail: e.to_string() })?;
        Self::configure(inner, pad_token.map(String::from), max_length, PathBuf::from(desc))
    }

    fn configure(mut inner: Tokenizer, pad_token: Option<String>, max_length: usize, path: PathBuf) -> Result<Self> {
        let err = |detail: String| WorkerError::Tokenizer { path: path.display().to_string(), detail };
        if max_length == 0 {
            return Err(err("the fixed length must be positive".into()));
        }
        let pad_token = pad_token.or_else(|| inner.get_padding().map(|p| p.pad_token.clone())).unwrap_or_else(|| "<pad>".into());
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| err(format!("the pad token {pad_token:?} is not in the vocabulary")))?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| err(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self { inner, path, max_length, pad_id })
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The fixed length of every row.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding token's id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes texts as they are (no cleaning): special tokens added, truncated, padded.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenizedPrompts> {
        let mut out = TokenizedPrompts {
            ids: Vec::with_capacity(texts.len() * self.max_length),
            attention_mask: Vec::new(),
            lengths: Vec::new(),
            max_length: self.max_length,
        };
        out.attention_mask.reserve(texts.len() * self.max_length);
        for &text in texts {
            let enc = self
                .inner
                .encode(text, true)
                .map_err(|e| WorkerError::Tokenizer { path: self.path.display().to_string(), detail: format!("{text:?}: {e}") })?;
            if enc.get_ids().len() != self.max_length || enc.get_attention_mask().len() != self.max_length {
                return Err(WorkerError::Tokenizer {
                    path: self.path.display().to_string(),
                    detail: format!("{text:?} gave {} tokens, not {}", enc.get_ids().len(), self.max_length),
                });
            }
            out.ids.extend_from_slice(enc.get_ids());
            out.attention_mask.extend_from_slice(enc.get_attention_mask());
            out.lengths.push(enc.get_attention_mask().iter().filter(|&&m| m > 0).count());
        }
        Ok(out)
    }
}

/// `pad_token` of `tokenizer_config.json` (a string or `{"content": …}`), if the file names one.
fn pad_token_of(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WorkerError::Config { path: path.display().to_string(), detail: e.to_string() })?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_tokenizer() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/t2v-a/tokenizer")
    }

    #[test]
    fn appends_eos_and_pads_to_the_fixed_length() {
        let tok = PromptTokenizer::load(&golden_tokenizer()).unwrap();
        let t = tok.tokenize(&["a red ball", ""]).unwrap();
        assert_eq!((t.batch(), t.max_length, t.ids.len()), (2, 512, 1024));
        let n = t.lengths[0];
        // transformers' tokenizer(..., padding="max_length", max_length=512, truncation=True)
        assert_eq!(t.tokens(0), &[4, 3, 5, 12, 15, 13, 23, 20, 1], "</s> ends the prompt");
        assert_eq!(t.tokens(1), &[1], "an empty prompt is just </s>");
        assert!(t.ids[n..512].iter().all(|&i| i == tok.pad_id()) && tok.pad_id() == 0);
        assert_eq!(t.attention_mask[..512].iter().filter(|&&m| m == 1).count(), n);
        assert!(t.attention_mask[n..512].iter().all(|&m| m == 0));
    }

    #[test]
    fn truncates_to_the_fixed_length_keeping_eos() {
        let tok = PromptTokenizer::with_max_length(&golden_tokenizer(), 8).unwrap();
        let t = tok.tokenize(&["a red ball bouncing on a wooden floor"]).unwrap();
        assert_eq!(t.lengths, vec![8]);
        assert_eq!(t.ids, vec![4, 3, 5, 12, 15, 13, 23, 1], "the last kept token is </s>");
        let full = PromptTokenizer::load(&golden_tokenizer()).unwrap().tokenize(&["a red ball bouncing on a wooden floor"]).unwrap();
        assert_eq!(&t.ids[..7], &full.ids[..7]);
        let long = "a red ball ".repeat(300);
        let t = PromptTokenizer::load(&golden_tokenizer()).unwrap().tokenize(&[&long]).unwrap();
        assert_eq!((t.lengths[0], t.ids[511]), (512, 1));
    }

    #[test]
    fn missing_files_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = PromptTokenizer::load(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(tmp.path().join("tokenizer.json"), "{not json").unwrap();
        assert!(PromptTokenizer::load(tmp.path()).is_err());
    }
}
