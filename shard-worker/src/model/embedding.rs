//! The condition embedder: timestep → modulation vectors, text states → context, image tokens →
//! image context (diffusers `WanTimeTextImageEmbedding`).

use super::layers::{AffineLayerNorm, Linear};
use crate::config::TransformerConfig;
use crate::weights::WeightSource;
use crate::{Result, WorkerError};
use tessera_kernels::cpu::{self, Activation};

/// Everything a block needs besides the tokens, replicated on every shard.
pub struct Conditions {
    /// Raw time embedding `[B, D]` (the output head's modulation input).
    pub temb: Vec<f32>,
    /// Projected time embedding `[B, 6·D]` (the blocks' modulation input).
    pub timestep_proj: Vec<f32>,
    /// Projected text context, per sample `[L, D]`.
    pub text: Vec<Vec<f32>>,
    /// Projected image context, per sample `[L_img, D]` (image-to-video only).
    pub image: Option<Vec<Vec<f32>>>,
}

struct ImageEmbedder {
    pos_embed: Option<Vec<f32>>,
    norm1: AffineLayerNorm,
    ff1: Linear,
    ff2: Linear,
    norm2: AffineLayerNorm,
    image_dim: usize,
}

/// Time, text and image embedders.
pub struct ConditionEmbedder {
    time1: Linear,
    time2: Linear,
    time_proj: Linear,
    text1: Linear,
    text2: Linear,
    image: Option<ImageEmbedder>,
    freq_dim: usize,
    text_dim: usize,
    dim: usize,
}

impl ConditionEmbedder {
    /// Loads the `condition_embedder.*` parameters.
    pub fn load(src: &dyn WeightSource, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let p = "condition_embedder";
        let image = match cfg.image_dim {
            None => None,
            Some(img) => Some(ImageEmbedder {
                pos_embed: match cfg.pos_embed_seq_len {
                    Some(n) => Some(src.tensor(&format!("{p}.image_embedder.pos_embed"), &[1, n, img])?),
                    None => None,
                },
                norm1: AffineLayerNorm::load(src, &format!("{p}.image_embedder.norm1"), img, 1e-5)?,
                ff1: Linear::load(src, &format!("{p}.image_embedder.ff.net.0.proj"), img, img)?,
                ff2: Linear::load(src, &format!("{p}.image_embedder.ff.net.2"), img, d)?,
                norm2: AffineLayerNorm::load(src, &format!("{p}.image_embedder.norm2"), d, 1e-5)?,
                image_dim: img,
            }),
        };
        Ok(Self {
            time1: Linear::load(src, &format!("{p}.time_embedder.linear_1"), cfg.freq_dim, d)?,
            time2: Linear::load(src, &format!("{p}.time_embedder.linear_2"), d, d)?,
            time_proj: Linear::load(src, &format!("{p}.time_proj"), d, 6 * d)?,
            text1: Linear::load(src, &format!("{p}.text_embedder.linear_1"), cfg.text_dim, d)?,
            text2: Linear::load(src, &format!("{p}.text_embedder.linear_2"), d, d)?,
            image,
            freq_dim: cfg.freq_dim,
            text_dim: cfg.text_dim,
            dim: d,
        })
    }

    /// Embeds timesteps `[B]`, text states `[B, L, text_dim]` and optional image tokens `[B, L_img, image_dim]`.
    pub fn forward(&self, timesteps: &[f32], text: &[f32], text_len: usize, image: Option<(&[f32], usize)>) -> Result<Conditions> {
        let b = timesteps.len();
        let sinus = cpu::timestep_embedding(timesteps, self.freq_dim, 0.0, 10000.0)?;
        let h = self.time1.forward(&sinus, b, Activation::Silu)?;
        let temb = self.time2.forward(&h, b, Activation::None)?;
        let mut act = temb.clone();
        cpu::apply_activation(&mut act, Activation::Silu);
        let timestep_proj = self.time_proj.forward(&act, b, Activation::None)?;

        let per_text = text_len * self.text_dim;
        let text = (0..b)
            .map(|i| {
                let h = self.text1.forward(&text[i * per_text..(i + 1) * per_text], text_len, Activation::GeluTanh)?;
                self.text2.forward(&h, text_len, Activation::None)
            })
            .collect::<Result<Vec<_>>>()?;

        let image = match (&self.image, image) {
            (None, None) => None,
            (Some(e), Some((img, n))) => Some((0..b).map(|i| e.forward(&img[i * n * e.image_dim..(i + 1) * n * e.image_dim], n)).collect::<Result<Vec<_>>>()?),
            (None, Some(_)) => return Err(WorkerError::input("encoder_hidden_states_image", "given to a text-to-video model")),
            (Some(_), None) => return Err(WorkerError::input("encoder_hidden_states_image", "required by an image-to-video model")),
        };
        debug_assert!(text.iter().all(|t| t.len() == text_len * self.dim));
        Ok(Conditions { temb, timestep_proj, text, image })
    }
}

impl ImageEmbedder {
    fn forward(&self, img: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut x = img.to_vec();
        if let Some(pos) = &self.pos_embed {
            if pos.len() != x.len() {
                return Err(WorkerError::input(
                    "encoder_hidden_states_image",
                    format!("{n} tokens, the model's position embedding has {}", pos.len() / self.image_dim),
                ));
            }
            x.iter_mut().zip(pos).for_each(|(a, b)| *a += b);
        }
        let h = self.norm1.forward(&x)?;
        let h = self.ff1.forward(&h, n, Activation::Gelu)?;
        let h = self.ff2.forward(&h, n, Activation::None)?;
        self.norm2.forward(&h)
    }
}
