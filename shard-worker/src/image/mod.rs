//! The image side of image-to-video: an 8-bit RGB image, transformers' `CLIPImageProcessor`
//! ([`processor`]) and `CLIPVisionModel` ([`clip`]), joined as the [`ImageEncoder`] that Wan 2.1
//! I2V's `image_encoder/` and `image_processor/` folders make.

pub mod clip;
pub mod config;
pub mod processor;

pub use clip::{ClipVisionEncoder, ClipVisionModel};
pub use config::{ClipProcessorConfig, ClipVisionConfig};

use crate::{Result, WorkerError};
use std::path::Path;
use tessera_kernels::backend::Backend;
use tessera_kernels::Tensor;

/// An 8-bit RGB image, rows of interleaved `r, g, b` (`[height, width, 3]`, as PIL and the golden
/// cases hold it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image from its pixels; the size must be positive and match the bytes.
    pub fn new(height: usize, width: usize, data: Vec<u8>) -> Result<Self> {
        let want = height.checked_mul(width).and_then(|n| n.checked_mul(3));
        if height == 0 || width == 0 || want != Some(data.len()) {
            return Err(WorkerError::input("image", format!("{} bytes are not a {height}×{width} RGB image", data.len())));
        }
        Ok(Self { height, width, data })
    }

    /// The image resized to `height` × `width` with PIL's `filter` (a copy when the size is the
    /// same), as diffusers' `VideoProcessor.preprocess` resizes a conditioning image (Lanczos).
    pub fn resized(&self, height: usize, width: usize, filter: tessera_kernels::cpu::resample::Filter) -> Self {
        let data = tessera_kernels::cpu::resample::resize_u8(&self.data, [self.height, self.width], 3, [height, width], filter);
        Self { height, width, data }
    }

    /// The image as `[1, 3, H, W]` in [−1, 1] (`2·x/255 − 1`), as diffusers' `VideoProcessor`
    /// hands a same-size image to the VAE.
    pub fn to_signed_unit(&self) -> Result<Tensor> {
        let plane = self.height * self.width;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = f32::from(px[c]) / 255.0 * 2.0 - 1.0;
            }
        }
        Ok(Tensor::new([1, 3, self.height, self.width], out)?)
    }
}

/// Wan 2.1 I2V's image encoder: the processor's configuration and the CLIP vision tower.
pub struct ImageEncoder {
    processor: ClipProcessorConfig,
    model: ClipVisionModel,
}

impl ImageEncoder {
    /// Loads `image_encoder/` (a `CLIPVisionModel` folder) and
    /// `image_processor/preprocessor_config.json`, checking that the crop is the encoder's size.
    pub fn load_on(encoder_dir: &Path, processor_dir: &Path, backend: Backend) -> Result<Self> {
        let processor = ClipProcessorConfig::from_file(&processor_dir.join("preprocessor_config.json"))?;
        let model = ClipVisionModel::load_on(encoder_dir, backend)?;
        Self::from_parts(processor, model)
    }

    /// Joins a processor configuration and a model whose input size it produces.
    pub fn from_parts(processor: ClipProcessorConfig, model: ClipVisionModel) -> Result<Self> {
        if processor.crop != model.config().image_size {
            return Err(WorkerError::Config {
                path: "image_processor".into(),
                detail: format!("crop_size {} differs from the image encoder's image_size {}", processor.crop, model.config().image_size),
            });
        }
        Ok(Self { processor, model })
    }

    /// The processor's configuration.
    pub fn processor(&self) -> &ClipProcessorConfig {
        &self.processor
    }

    /// The vision tower.
    pub fn model(&self) -> &ClipVisionModel {
        &self.model
    }

    /// `CLIPImageProcessor(image).pixel_values`, `[1, 3, S, S]`.
    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor> {
        processor::clip_pixel_values(&self.processor, image)
    }

    /// The image tokens Wan's transformer attends to, `[1, tokens, d]`: the processed image
    /// through every layer but the last.
    pub fn encode(&self, image: &RgbImage) -> Result<Tensor> {
        self.model.image_embeds(&self.pixel_values(image)?)
    }
}
