//! What the planner knows of a model: the transformer's shape, its text encoder and its VAE, as
//! sizes and operation counts (never weights). Wan 2.1 shapes come from the one
//! [`TransformerConfig`] (a preset or a diffusers `config.json`); HunyuanVideo is here for
//! calibration against published figures.

use tessera_cluster::limits::ModelFactors;
use tessera_cluster::transformer_config::TransformerConfig;

/// Bytes per element of weights and activations on a GPU (bf16).
pub const BF16: u64 = 2;

/// Elementwise passes over a `hidden`-wide bf16 vector per token per block outside the GEMMs and
/// attention (three norms, their modulation, the q/k RMSNorm and RoPE, three gated residual adds,
/// each a read and a write): an estimate, used for the memory-bound "rest" of a block.
const REST_PASSES_PER_BLOCK: u64 = 24;

/// The VAE's decoder as the planner counts it: stages of causal 3×3×3 convolutions from the
/// latent's resolution up to the video's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VaeShape {
    /// Channels of the full-resolution stage (96 in Wan 2.1, 128 in HunyuanVideo).
    pub base: u64,
    /// Channel multipliers of the stages, full resolution first (`[1, 2, 4, 4]` in both).
    pub mult: [u64; 4],
    /// Residual blocks per decoder stage (each two convolutions; 3 in both).
    pub res_blocks: u64,
    /// Parameters of the whole VAE.
    pub params: u64,
}

impl VaeShape {
    /// Wan 2.1's VAE (reference §4.1: 126.9 M parameters).
    pub const WAN: Self = Self { base: 96, mult: [1, 2, 4, 4], res_blocks: 3, params: 126_900_000 };
    /// HunyuanVideo's causal VAE (published: 246 M parameters).
    pub const HUNYUAN: Self = Self { base: 128, mult: [1, 2, 4, 4], res_blocks: 3, params: 246_000_000 };

    /// The decoder's stages, lowest resolution first: `(channels, convolutions, spatial divisor,
    /// temporal divisor)` relative to the decoded video, for a model with `factors`. Each stage
    /// has its residual blocks' convolutions and one resampling convolution; the lowest one also
    /// the middle block (two residual blocks).
    pub fn stages(&self, factors: ModelFactors) -> [(u64, u64, u64, u64); 4] {
        let (s, t) = (factors.spatial.max(1), factors.temporal.max(1));
        let conv = 2 * self.res_blocks + 1;
        [
            (self.base * self.mult[3], conv + 4, s, t),
            (self.base * self.mult[2], conv, (s / 2).max(1), (t / 2).max(1)),
            (self.base * self.mult[1], conv, (s / 4).max(1), 1),
            (self.base * self.mult[0], conv, 1, 1),
        ]
    }
}

/// A diffusion transformer, its text encoder and VAE, as the planner counts them.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    /// Name (a preset's, or the `config.json` path).
    pub name: String,
    /// Transformer blocks.
    pub layers: u64,
    /// Attention heads (a Ulysses degree must divide them).
    pub heads: u64,
    /// Channels per head.
    pub head_dim: u64,
    /// Feed-forward width.
    pub ffn: u64,
    /// Multiply-adds per video token per block in the linear layers.
    pub token_weights: u64,
    /// Text tokens the model attends to.
    pub text_len: u64,
    /// Whether the text tokens join the self-attention (and the blocks' linear layers), as in
    /// HunyuanVideo, rather than being cross-attended, as in Wan.
    pub text_joint: bool,
    /// Multiply-adds per cross-attended text or image token per block (their key and value).
    pub context_weights: u64,
    /// Image tokens cross-attended (image-to-video: CLIP's 257).
    pub image_len: u64,
    /// Latent channels in and out of the transformer, times the patch volume.
    pub patch_in: u64,
    /// Latent channels out times the patch volume.
    pub patch_out: u64,
    /// Latent channels the sampler keeps.
    pub latent_channels: u64,
    /// Transformer parameters.
    pub params: u64,
    /// Whether guidance is distilled into the model (one forward per step whatever the scale).
    pub guidance_distilled: bool,
    /// Whether the model makes long videos by diffusion forcing (SkyReels-V2: chunk by chunk).
    pub diffusion_forcing: bool,
    /// Parameters of the text encoder(s).
    pub text_encoder_params: u64,
    /// Parameters of the image encoder (image-to-video: Wan's CLIP ViT-H/14; 0 for the others).
    pub image_encoder_params: u64,
    /// The VAE.
    pub vae: VaeShape,
    /// The VAE's factors (the token count of a job follows from them).
    pub factors: ModelFactors,
}

/// One forward's work, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardWork {
    /// Attention FLOPs (q·kᵀ and p·v, self and cross).
    pub attention_flops: f64,
    /// Of those, the self-attention's (full attention: every query against every key).
    pub self_attention_flops: f64,
    /// Linear-layer FLOPs (projections, feed-forward, embeddings).
    pub linear_flops: f64,
    /// FLOPs of the rest (norms, modulation, RoPE, activations, residual adds).
    pub rest_flops: f64,
    /// HBM bytes of the rest, which is bound by memory, not FLOPs.
    pub rest_bytes: f64,
}

impl ModelShape {
    /// A Wan 2.1 transformer from its configuration, with UMT5-XXL's encoder (5.68 B parameters,
    /// 512 tokens) and Wan's VAE.
    pub fn wan(name: &str, c: &TransformerConfig) -> Self {
        let d = c.inner_dim() as u64;
        Self {
            name: name.into(),
            layers: c.num_layers as u64,
            heads: c.num_attention_heads as u64,
            head_dim: c.attention_head_dim as u64,
            ffn: c.ffn_dim as u64,
            token_weights: c.token_weights(),
            text_len: 512,
            text_joint: false,
            context_weights: 2 * d * d,
            image_len: if c.is_i2v() { 257 } else { 0 },
            patch_in: c.patch_in() as u64,
            patch_out: c.patch_out() as u64,
            latent_channels: c.out_channels as u64,
            params: c.parameter_count() as u64,
            guidance_distilled: false,
            diffusion_forcing: c.is_skyreels_v2(),
            text_encoder_params: 5_680_000_000,
            image_encoder_params: if c.is_i2v() { VIT_H14_PARAMS } else { 0 },
            vae: VaeShape::WAN,
            factors: ModelFactors::WAN,
        }
    }

    /// HunyuanVideo (published architecture: hidden 3072 in 24 heads, 20 dual-stream and 40
    /// single-stream blocks, 12·d² multiply-adds per token per block, 256 text tokens joining the
    /// attention, guidance distilled, 12.8 B parameters; LLaVA-Llama-3-8B and CLIP-L encode the
    /// text).
    pub fn hunyuan_video() -> Self {
        let d = 3072;
        Self {
            name: "hunyuanvideo".into(),
            layers: 60,
            heads: 24,
            head_dim: 128,
            ffn: 4 * d,
            token_weights: 12 * d * d,
            text_len: 256,
            text_joint: true,
            context_weights: 0,
            image_len: 0,
            patch_in: 16 * 4,
            patch_out: 16 * 4,
            latent_channels: 16,
            params: 12_800_000_000,
            guidance_distilled: true,
            diffusion_forcing: false,
            text_encoder_params: 8_150_000_000,
            image_encoder_params: 0,
            vae: VaeShape::HUNYUAN,
            factors: ModelFactors::WAN,
        }
    }

    /// Hidden width.
    pub fn hidden(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// Tokens in the self-attention for `tokens` video tokens (the text joins it in joint models).
    pub fn attention_tokens(&self, tokens: u64) -> u64 {
        tokens + if self.text_joint { self.text_len } else { 0 }
    }

    /// Transformer forwards per denoising step at `guidance` (enabled or not).
    pub fn forwards_per_step(&self, guidance: bool) -> u64 {
        if guidance && !self.guidance_distilled {
            2
        } else {
            1
        }
    }

    /// The work of one forward over `tokens` video tokens, by part.
    pub fn forward(&self, tokens: u64) -> ForwardWork {
        let (n, d, l) = (tokens as f64, self.hidden() as f64, self.layers as f64);
        let s = self.attention_tokens(tokens) as f64;
        let context = if self.text_joint { 0.0 } else { self.text_len as f64 } + self.image_len as f64;
        let self_attention = l * 4.0 * s * s * d;
        let attention = self_attention + l * 4.0 * n * context * d;
        let embed = 2.0 * n * (self.patch_in as f64) * d + 2.0 * n * d * (self.patch_out as f64);
        let linear = l * (2.0 * s * self.token_weights as f64 + 2.0 * context * self.context_weights as f64) + embed;
        let ffn = self.ffn as f64;
        // ~5 FLOPs per element of each norm, modulation and residual add, ~8 per GELU element.
        let rest_flops = l * s * (20.0 * d + 8.0 * ffn);
        let rest_bytes = l * s * (REST_PASSES_PER_BLOCK as f64 * d + 2.0 * ffn) * BF16 as f64;
        ForwardWork { attention_flops: attention, self_attention_flops: self_attention, linear_flops: linear, rest_flops, rest_bytes }
    }

    /// FLOPs of an image-to-video job's image stage: the image encoder over its tokens (2 per
    /// parameter per token), and the VAE encoding the condition video (the image, then black
    /// frames: `frames` of `height × width`), priced at two thirds of decoding it (the encoder's
    /// stages have 2 residual blocks where the decoder's have 3, and no upsampling convolutions).
    /// 0 for a model without an image encoder.
    pub fn image_encode_flops(&self, frames: u64, height: u64, width: u64) -> f64 {
        if self.image_encoder_params == 0 {
            return 0.0;
        }
        2.0 * self.image_encoder_params as f64 * self.image_len as f64 + self.vae_decode_work(frames, height, width).0 * 2.0 / 3.0
    }

    /// FLOPs of encoding one prompt with the text encoder (2 per parameter per token).
    pub fn text_encode_flops(&self) -> f64 {
        2.0 * self.text_encoder_params as f64 * self.text_len as f64
    }

    /// FLOPs and HBM bytes of decoding a latent of `latent_frames` frames into `frames` frames of
    /// `height × width` pixels: each 3×3×3 convolution costs 2·27·c² FLOPs per output voxel and
    /// moves about six c-wide bf16 vectors per voxel (its input, output, norm and activation).
    pub fn vae_decode_work(&self, frames: u64, height: u64, width: u64) -> (f64, f64) {
        let (mut flops, mut bytes) = (0.0, 0.0);
        for (c, convs, s, t) in self.vae.stages(self.factors) {
            let voxels = frames.div_ceil(t) as f64 * (height.div_ceil(s) * width.div_ceil(s)) as f64;
            flops += convs as f64 * 2.0 * 27.0 * (c * c) as f64 * voxels;
            bytes += convs as f64 * 6.0 * c as f64 * voxels * BF16 as f64;
        }
        (flops, bytes)
    }

    /// Working set of the VAE decoder in bytes for one temporal chunk over `pixels` output pixels:
    /// three live tensors of the widest stage plus the causal cache (two frames per convolution).
    pub fn vae_chunk_bytes(&self, pixels: u64) -> u64 {
        let mut live = 0;
        let mut cache = 0;
        for (c, convs, s, t) in self.vae.stages(self.factors) {
            let stage_pixels = pixels.div_ceil(s * s);
            // a chunk is one latent frame: `temporal / t` frames at this stage
            let frames = (self.factors.temporal / t).max(1);
            live = live.max(3 * c * stage_pixels * frames * BF16);
            cache += convs * 2 * c * stage_pixels * BF16;
        }
        live + cache
    }
}

/// Parameters of CLIP ViT-H/14 at 224 pixels, Wan 2.1 I2V's image encoder (as
/// `ClipVisionConfig::parameter_count` counts them: 32 layers of width 1280, 257 positions).
pub const VIT_H14_PARAMS: u64 = 630_766_080;

/// The models `tessera plan --model` knows by name (SkyReels-V2 DF: the Wan shapes with the fps
/// embedding on the 1.3B, as their `config.json` says; 540P and 720P share a transformer).
pub const PRESETS: [&str; 6] = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "skyreels-v2-df-1.3b", "skyreels-v2-df-14b", "hunyuanvideo"];

/// SkyReels-V2's diffusion-forcing transformer of the Wan shape `wan`.
fn skyreels_df(wan: TransformerConfig, inject_sample_info: bool) -> TransformerConfig {
    let class_name = Some(tessera_cluster::transformer_config::SKYREELS_V2_CLASS.to_string());
    TransformerConfig { class_name, inject_sample_info, ..wan }
}

/// The preset named `name`, or `None`.
pub fn preset(name: &str) -> Option<ModelShape> {
    match name {
        "wan2.1-t2v-1.3b" => Some(ModelShape::wan(name, &TransformerConfig::wan21_t2v_1_3b())),
        "wan2.1-t2v-14b" => Some(ModelShape::wan(name, &TransformerConfig::wan21_t2v_14b())),
        "wan2.1-i2v-14b" => Some(ModelShape::wan(name, &TransformerConfig::wan21_i2v_14b())),
        "skyreels-v2-df-1.3b" => Some(ModelShape::wan(name, &skyreels_df(TransformerConfig::wan21_t2v_1_3b(), true))),
        "skyreels-v2-df-14b" => Some(ModelShape::wan(name, &skyreels_df(TransformerConfig::wan21_t2v_14b(), false))),
        "hunyuanvideo" => Some(ModelShape::hunyuan_video()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_flop_counts() {
        // parallelism.md: 60 s at 16 fps, 1080p, Wan 14B: 1,966,560 tokens and 7.9e16
        // full-attention FLOPs per layer per forward.
        let m = preset("wan2.1-t2v-14b").unwrap();
        let w = m.forward(1_966_560);
        let per_layer = 4.0 * 1_966_560f64.powi(2) * 5120.0;
        assert!((per_layer / 7.9e16 - 1.0).abs() < 0.01, "{per_layer:e}");
        // attention is about 99 % of the FLOPs at that length
        let share = w.attention_flops / (w.attention_flops + w.linear_flops);
        assert!(share > 0.98 && share < 0.995, "{share}");
        // Linear FLOPs per video token are twice the parameters a video token meets: all but the
        // text-side keys and values (2·d² per block) and the text and time embedders (~3 % of
        // the rest, hence the tolerance).
        let n = 75_600.0;
        let w = m.forward(75_600);
        let video_params = (m.params - 2 * 5120 * 5120 * m.layers) as f64;
        let ratio = (w.linear_flops - 2.0 * 512.0 * m.context_weights as f64 * m.layers as f64) / (2.0 * n * video_params);
        assert!((ratio - 1.0).abs() < 0.03, "{ratio}");
    }

    #[test]
    fn presets_and_guidance() {
        for name in PRESETS {
            assert_eq!(preset(name).unwrap().name, name);
        }
        assert!(preset("sora").is_none());
        let h = ModelShape::hunyuan_video();
        assert_eq!(h.forwards_per_step(true), 1);
        assert_eq!(preset("wan2.1-t2v-1.3b").unwrap().forwards_per_step(true), 2);
        assert_eq!(h.attention_tokens(118_800), 119_056);
    }
}
