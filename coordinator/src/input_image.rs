//! An image-to-video request's input image: PNG, JPEG or WebP, told apart by their leading bytes
//! (never by a file name), decoded by the `image` crate into 8-bit RGB rows.
//!
//! Input may be hostile. The size is read from the header first ([`probe`]) and checked against
//! [`MAX_IMAGE_SIDE`] before a pixel is decoded, and the decoder runs under the `image` crate's
//! limits (the same sides, and an allocation cap of the largest accepted image), so a
//! decompression bomb or a 100,000-pixel-wide PNG is refused in microseconds, in bounded memory.
//! Every problem is an `INVALID_ARGUMENT` naming `input_image`. An alpha channel is dropped, as
//! PIL's `convert("RGB")` (what diffusers and transformers call) drops it.

use crate::CoordinatorError;
use image::{ImageFormat, ImageReader, Limits};
use std::io::Cursor;
use tessera_cluster::job::MAX_IMAGE_SIDE;
use tessera_cluster::ImageSize;

/// Largest input image accepted, in bytes (the compressed file).
pub const MAX_INPUT_IMAGE_BYTES: usize = 32 << 20;

/// A decoded input image: interleaved 8-bit RGB rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    /// Its size.
    pub size: ImageSize,
    /// `height · width · 3` bytes.
    pub rgb: Vec<u8>,
}

fn invalid(detail: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument { field: "input_image", detail: detail.into() }
}

/// The format from the leading bytes: PNG, JPEG or WebP, nothing else.
fn format_of(bytes: &[u8]) -> Result<ImageFormat, CoordinatorError> {
    if bytes.is_empty() {
        return Err(invalid("is empty"));
    }
    if bytes.len() > MAX_INPUT_IMAGE_BYTES {
        return Err(invalid(format!("is {} bytes, at most {MAX_INPUT_IMAGE_BYTES} are accepted", bytes.len())));
    }
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => Ok(f),
        Ok(other) => Err(invalid(format!("is {other:?}; PNG, JPEG and WebP are accepted"))),
        Err(_) => {
            let head: String = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(invalid(format!("starts with {head}, which is no PNG, JPEG or WebP signature")))
        }
    }
}

/// The decoder's limits: the accepted sides, and memory for the largest accepted image with an
/// alpha channel at 16 bits per sample.
fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(u64::from(MAX_IMAGE_SIDE) * u64::from(MAX_IMAGE_SIDE) * 8);
    limits
}

fn reader(bytes: &[u8], format: ImageFormat, limits: Limits) -> ImageReader<Cursor<&[u8]>> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    reader
}

/// The image's size from its header alone, checked (each side from 1 to [`MAX_IMAGE_SIDE`]).
/// Reading a header allocates no pixels, so the sides are read unbounded and checked here, where
/// the message can give them; the memory cap still holds.
pub fn probe(bytes: &[u8]) -> Result<ImageSize, CoordinatorError> {
    let format = format_of(bytes)?;
    let mut header = limits();
    (header.max_image_width, header.max_image_height) = (None, None);
    let (width, height) = reader(bytes, format, header).into_dimensions().map_err(|e| invalid(format!("{}: {e}", format_name(format))))?;
    ImageSize { width, height }.check("input_image").map_err(|e| match e {
        tessera_cluster::ClusterError::InvalidInput { detail, .. } => invalid(detail),
        other => other.into(),
    })
}

/// Decodes the image (after [`probe`]'s checks) into 8-bit RGB.
pub fn decode(bytes: &[u8]) -> Result<DecodedImage, CoordinatorError> {
    let size = probe(bytes)?;
    let format = format_of(bytes)?;
    let image = reader(bytes, format, limits()).decode().map_err(|e| invalid(format!("{}: {e}", format_name(format))))?;
    if (image.width(), image.height()) != (size.width, size.height) {
        return Err(invalid(format!("the header says {}x{}, the pixels are {}x{}", size.width, size.height, image.width(), image.height())));
    }
    Ok(DecodedImage { size, rgb: image.into_rgb8().into_raw() })
}

/// [`decode`] on a blocking thread.
pub async fn decode_blocking(bytes: Vec<u8>) -> Result<DecodedImage, CoordinatorError> {
    tokio::task::spawn_blocking(move || decode(&bytes)).await.map_err(|e| CoordinatorError::Internal(format!("the image decoding thread failed: {e}")))?
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::WebP => "webp",
        _ => "image",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `w`×`h` RGB pixels (a gradient).
    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = ::png::Encoder::new(&mut out, w, h);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h).flat_map(|i| [(i % w) as u8, (i / w) as u8, 128]).collect();
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
        out
    }

    fn refused(bytes: &[u8]) -> String {
        match decode(bytes) {
            Err(CoordinatorError::InvalidArgument { field: "input_image", detail }) => detail,
            other => panic!("expected input_image to be refused, got {other:?}"),
        }
    }

    #[test]
    fn png_decodes_to_its_pixels() {
        let d = decode(&png(5, 3)).unwrap();
        assert_eq!((d.size.width, d.size.height, d.rgb.len()), (5, 3, 45));
        assert_eq!(&d.rgb[3 * 7..3 * 8], &[2, 1, 128], "row 1, column 2");
    }

    #[test]
    fn garbage_and_other_formats_are_named() {
        assert!(refused(b"").contains("empty"));
        assert!(refused(b"hello, world").contains("signature"));
        assert!(refused(b"GIF89a\x01\x00\x01\x00").contains("Gif"));
        // A truncated PNG: the signature is right, the rest is not.
        let mut cut = png(16, 16);
        cut.truncate(40);
        assert!(refused(&cut).contains("png"));
    }

    /// A 100,000-pixel-wide PNG whose data is a few bytes (a decompression bomb's header): refused
    /// from the header, before anything is allocated, within a millisecond.
    #[test]
    fn oversized_images_are_refused_from_the_header() {
        let mut bomb = png(1, 1);
        // IHDR width at bytes 16..20, its CRC at 29..33.
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let start = std::time::Instant::now();
        let detail = refused(&bomb);
        assert!(detail.contains("100000") || detail.contains("limit"), "{detail}");
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
        assert!(refused(&png(4097, 1)).contains("4096"));
    }

    /// CRC-32 (ISO-HDLC), as PNG chunks carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
