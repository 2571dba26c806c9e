//! Prompt → embedding, as the Wan pipelines do it (reference §3, steps 1–6): clean, tokenize to
//! 512 tokens, encode, keep each prompt's own rows and set the rest to exact zeros.

use super::clean::prompt_clean;
use super::tokenizer::{PromptTokenizer, TokenizedPrompts};
use super::umt5::Umt5EncoderModel;
use crate::{Result, WorkerError};
use std::path::Path;
use tessera_kernels::backend::Backend;
use tessera_kernels::Tensor;

/// The tokenizer and the UMT5 encoder of a Wan pipeline.
pub struct TextEncoder {
    tokenizer: PromptTokenizer,
    encoder: Umt5EncoderModel,
}

impl TextEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a diffusers snapshot folder, the encoder on the
    /// CPU.
    pub fn load(snapshot: &Path) -> Result<Self> {
        Self::load_on(snapshot, Backend::Cpu)
    }

    /// [`load`](Self::load) with the encoder on `backend`.
    pub fn load_on(snapshot: &Path, backend: Backend) -> Result<Self> {
        Self::load_parts(&snapshot.join("tokenizer"), &snapshot.join("text_encoder"), backend)
    }

    /// Loads a tokenizer folder and an encoder folder given separately, the encoder on `backend`.
    pub fn load_parts(tokenizer_dir: &Path, encoder_dir: &Path, backend: Backend) -> Result<Self> {
        Ok(Self::new(PromptTokenizer::load(tokenizer_dir)?, Umt5EncoderModel::load_on(encoder_dir, backend)?))
    }

    /// Pairs an already-loaded tokenizer and encoder.
    pub fn new(tokenizer: PromptTokenizer, encoder: Umt5EncoderModel) -> Self {
        Self { tokenizer, encoder }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The encoder.
    pub fn encoder(&self) -> &Umt5EncoderModel {
        &self.encoder
    }

    /// Steps 1–2: cleans each prompt and tokenizes it to the fixed length.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<TokenizedPrompts> {
        let cleaned: Vec<String> = prompts.iter().map(|p| prompt_clean(p)).collect();
        let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        self.tokenizer.tokenize(&refs)
    }

    /// Steps 3–6 on tokenized prompts: `[batch, max_length, d_model]`, rows past each prompt's
    /// length exactly zero. Each prompt is encoded on its real tokens only, which gives the same
    /// rows as the padded, masked batch upstream runs.
    pub fn encode_tokenized(&self, tokens: &TokenizedPrompts) -> Result<Tensor> {
        let (batch, len, d) = (tokens.batch(), tokens.max_length, self.encoder.config().d_model);
        if tokens.ids.len() != batch * len {
            return Err(WorkerError::input("tokens", format!("{} ids for {batch} rows of {len}", tokens.ids.len())));
        }
        if let Some(&n) = tokens.lengths.iter().find(|&&n| n > len) {
            return Err(WorkerError::input("tokens", format!("a length of {n} exceeds the row length {len}")));
        }
        let sequences: Vec<&[u32]> = (0..batch).map(|i| tokens.tokens(i)).collect();
        let encoded = self.encoder.encode_unpadded(&sequences)?;
        let mut out = vec![0.0f32; batch * len * d];
        for (i, rows) in encoded.iter().enumerate() {
            out[i * len * d..i * len * d + rows.len()].copy_from_slice(rows.data());
        }
        Ok(Tensor::new([batch, len, d], out)?)
    }

    /// The whole path: `[prompts.len(), 512, d_model]` embeddings, zero past each prompt.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        self.encode_tokenized(&self.tokenize(prompts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{CaseMeta, Comparison};
    use crate::weights::SafetensorsFile;
    use std::path::PathBuf;

    fn pipeline_case() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/t2v-a")
    }

    /// `case.json`'s prompt and negative prompt.
    fn prompts() -> (String, String) {
        let text = std::fs::read_to_string(pipeline_case().join("case.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (v["prompt"].as_str().unwrap().to_string(), v["negative_prompt"].as_str().unwrap().to_string())
    }

    #[test]
    fn reproduces_the_pipeline_ids_and_embeddings() {
        let case = pipeline_case();
        let encoder = TextEncoder::load(&case).unwrap();
        let io = SafetensorsFile::open(&case.join("io.safetensors")).unwrap();
        let (prompt, negative) = prompts();
        let tokens = encoder.tokenize(&[&prompt, &negative]).unwrap();
        for (i, name) in ["prompt_ids", "negative_prompt_ids"].into_iter().enumerate() {
            let (_, want) = io.read_i64(name).unwrap();
            let got: Vec<i64> = tokens.tokens(i).iter().map(|&t| t as i64).collect();
            assert_eq!(got, want, "{name}");
        }
        let start = std::time::Instant::now();
        let embeds = encoder.encode_tokenized(&tokens).unwrap();
        eprintln!("pipeline/t2v-a: encoded 2 prompts in {:?}", start.elapsed());
        let d = encoder.encoder().config().d_model;
        assert_eq!(embeds.shape(), &[2, 512, d]);
        // reference §3 tolerance for this check: rel_l2 1e-4 (max |err| within the case's own bound)
        let tol = crate::golden::Tolerance { rel_l2: 1e-4, ..CaseMeta::read(&case).unwrap().tolerance };
        for (i, name) in ["prompt_embeds", "negative_prompt_embeds"].into_iter().enumerate() {
            let (shape, want) = io.read_f32(name).unwrap();
            assert_eq!(shape, vec![1, 512, d]);
            let got = &embeds.data()[i * 512 * d..(i + 1) * 512 * d];
            let c = Comparison::new(got, &want, &tol);
            eprintln!("{name}: rel_l2 {:.3e} max_abs {:.3e}", c.rel_l2, c.max_abs);
            assert!(c.passed, "{name}: {c:?}");
            let n = tokens.lengths[i];
            assert!(got[n * d..].iter().all(|&x| x == 0.0), "{name}: rows past {n} must be exact zeros");
            assert!(got[..n * d].iter().all(|&x| x != 0.0));
        }
        // the one-call path gives the same
        assert_eq!(encoder.encode_prompts(&[&prompt, &negative]).unwrap(), embeds);
    }

    #[test]
    fn cleaning_happens_before_tokenization() {
        let encoder = TextEncoder::load(&pipeline_case()).unwrap();
        let (prompt, _) = prompts();
        let messy = format!("  {}\n", prompt.replace(' ', " \n\t\u{3000}"));
        assert_eq!(encoder.tokenize(&[&messy]).unwrap(), encoder.tokenize(&[&prompt]).unwrap());
        let entity = prompt.replace(" a ", " &#97; ");
        assert_ne!(entity, prompt);
        assert_eq!(encoder.tokenize(&[&entity]).unwrap(), encoder.tokenize(&[&prompt]).unwrap());
    }
}
