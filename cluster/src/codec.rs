//! The codecs of the internal API, written once for both ends: latents (`JobLatents`), a
//! checkpoint's latents (`CheckpointResponse`), input frames (`InputFrames`, the coordinator's
//! prepared video in [−1, 1]) and decoded frames (`DecodedFrames`, rank 0's output in [0, 1]).
//! Every decoder treats the message as hostile: sizes are multiplied with checked arithmetic and
//! must match the bytes that came, before anything is allocated from them.

use crate::{ClusterError, Result, Tensor};
use tessera_proto::worker::v1 as pb;

/// Bytes of an NCCL unique id (`ncclUniqueId`), which rank 0 hands the coordinator and the
/// coordinator hands the other ranks.
pub const NCCL_ID_BYTES: usize = 128;

/// Most dimensions a tensor on the wire may have.
const MAX_RANK: usize = 8;

/// `data` as float32 little-endian bytes.
pub fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A tensor of `shape` from float32 little-endian `bytes`; `field` names the message field in the
/// error. The element count is a checked product and must match the bytes exactly.
pub fn tensor_from_bytes(field: &'static str, shape: &[u32], bytes: &[u8]) -> Result<Tensor> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(ClusterError::input(field, format!("a shape of {} dimensions (1 to {MAX_RANK} are accepted)", shape.len())));
    }
    let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize));
    if elements.and_then(|n| n.checked_mul(4)) != Some(bytes.len()) {
        return Err(ClusterError::input(field, format!("{} bytes are not a float32 tensor of shape {shape:?}", bytes.len())));
    }
    let data = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Tensor::new(shape.iter().map(|&d| d as usize).collect::<Vec<_>>(), data)?)
}

fn dims_u32(field: &'static str, dims: &[usize]) -> Result<Vec<u32>> {
    dims.iter().map(|&d| u32::try_from(d).map_err(|_| ClusterError::input(field, format!("dimension {d} does not fit the wire's u32")))).collect()
}

/// A job's whole latent `[1, C, T, H, W]` as `JobLatents` (shape `[C, T, H, W]`).
pub fn latents_message(latents: &Tensor) -> Result<pb::JobLatents> {
    if latents.shape().len() != 5 || latents.dim(0) != 1 {
        return Err(ClusterError::input("latents", format!("shape {:?} is not [1, C, T, H, W]", latents.shape())));
    }
    Ok(pb::JobLatents { shape: dims_u32("latents", &latents.shape()[1..])?, data: f32_bytes(latents.data()) })
}

/// The latent `[1, C, T, H, W]` a `JobLatents` carries.
pub fn latents_from_message(m: &pb::JobLatents) -> Result<Tensor> {
    if m.shape.len() != 4 {
        return Err(ClusterError::input("latents", format!("shape {:?} is not [C, T, H, W]", m.shape)));
    }
    let t = tensor_from_bytes("latents", &m.shape, &m.data)?;
    let shape = [&[1usize][..], t.shape()].concat();
    Ok(t.reshape(shape)?)
}

/// The latent `[1, C, T, H, W]` of a checkpoint (as a resuming group receives it).
pub fn checkpoint_latents(cp: &pb::CheckpointResponse) -> Result<Tensor> {
    if cp.latent_shape.len() != 5 {
        return Err(ClusterError::input("resume.latents", format!("shape {:?} is not [1, C, T, H, W]", cp.latent_shape)));
    }
    tensor_from_bytes("resume.latents", &cp.latent_shape, &cp.latents)
}

/// The frame count, height and width of a video or frame chunk `[1, 3, F, H, W]`.
fn video_dims(field: &'static str, t: &Tensor) -> Result<(usize, usize, usize)> {
    match t.shape() {
        &[1, 3, f, h, w] => Ok((f, h, w)),
        s => Err(ClusterError::input(field, format!("shape {s:?} is not [1, 3, F, H, W]"))),
    }
}

/// Checks that `rgb` is `frames` frames of `width × height` interleaved RGB (checked products).
fn check_rgb(field: &'static str, frames: u32, width: u32, height: u32, rgb: &[u8]) -> Result<(usize, usize, usize)> {
    let (f, h, w) = (frames as usize, height as usize, width as usize);
    let bytes = h.checked_mul(w).and_then(|p| p.checked_mul(f)).and_then(|n| n.checked_mul(3));
    if f == 0 || bytes != Some(rgb.len()) {
        return Err(ClusterError::input(field, format!("{} bytes are not {f} frames of {w}x{h} RGB", rgb.len())));
    }
    Ok((f, h, w))
}

/// Planar `[3, F, H, W]` values mapped by `to_unit` into [0, 1], as interleaved 8-bit RGB.
fn planar_to_rgb8(data: &[f32], (f, h, w): (usize, usize, usize), to_unit: impl Fn(f32) -> f32) -> Vec<u8> {
    let plane = h * w;
    let mut rgb = Vec::with_capacity(f * plane * 3);
    for t in 0..f {
        for p in 0..plane {
            for c in 0..3 {
                rgb.push((to_unit(data[(c * f + t) * plane + p]).clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    rgb
}

/// Interleaved 8-bit RGB as planar `[1, 3, F, H, W]`, each level mapped by `from_level`.
fn rgb8_to_planar(rgb: &[u8], (f, h, w): (usize, usize, usize), from_level: impl Fn(u8) -> f32) -> Result<Tensor> {
    let plane = h * w;
    let mut data = vec![0.0f32; rgb.len()];
    for t in 0..f {
        for p in 0..plane {
            for c in 0..3 {
                data[(c * f + t) * plane + p] = from_level(rgb[(t * plane + p) * 3 + c]);
            }
        }
    }
    Ok(Tensor::new([1, 3, f, h, w], data)?)
}

/// The coordinator's prepared input video `[1, 3, F, H, W]` in [−1, 1] as `InputFrames`.
pub fn input_frames_message(video: &Tensor) -> Result<pb::InputFrames> {
    let dims = video_dims("input_frames", video)?;
    let [frames, height, width] = dims_u32("input_frames", &[dims.0, dims.1, dims.2])?.try_into().expect("three dimensions");
    Ok(pb::InputFrames { frames, width, height, rgb: planar_to_rgb8(video.data(), dims, |x| (x + 1.0) * 0.5) })
}

/// The video `[1, 3, F, H, W]` in [−1, 1] that `InputFrames` carries.
pub fn input_frames_video(m: &pb::InputFrames) -> Result<Tensor> {
    let dims = check_rgb("input_frames", m.frames, m.width, m.height, &m.rgb)?;
    rgb8_to_planar(&m.rgb, dims, |v| v as f32 / 127.5 - 1.0)
}

/// An image-to-video job's input image (interleaved 8-bit RGB rows, `size`) as `InputFrames` of
/// one frame.
pub fn input_image_message(size: crate::ImageSize, rgb: Vec<u8>) -> Result<pb::InputFrames> {
    check_rgb("input_image", 1, size.width, size.height, &rgb)?;
    Ok(pb::InputFrames { frames: 1, width: size.width, height: size.height, rgb })
}

/// The input image `InputFrames` carries, checked against the spec's `size`: one frame of
/// exactly that size. Returns its interleaved 8-bit RGB rows.
pub fn input_image(m: &pb::InputFrames, size: crate::ImageSize) -> Result<&[u8]> {
    if m.frames != 1 || m.width != size.width || m.height != size.height {
        return Err(ClusterError::input(
            "input_image",
            format!("{} frames of {}x{}, the spec says one of {}x{}", m.frames, m.width, m.height, size.width, size.height),
        ));
    }
    check_rgb("input_image", 1, m.width, m.height, &m.rgb)?;
    Ok(&m.rgb)
}

/// Decoded frames `[1, 3, n, H, W]` in [0, 1] as `DecodedFrames`, the first being frame
/// `first_frame` of the video.
pub fn decoded_frames_message(frames: &Tensor, first_frame: u32) -> Result<pb::DecodedFrames> {
    let dims = video_dims("frames", frames)?;
    let [count, height, width] = dims_u32("frames", &[dims.0, dims.1, dims.2])?.try_into().expect("three dimensions");
    Ok(pb::DecodedFrames { first_frame, count, width, height, rgb: planar_to_rgb8(frames.data(), dims, |x| x) })
}

/// The frames `[1, 3, n, H, W]` in [0, 1] that `DecodedFrames` carries.
pub fn decoded_frames(m: &pb::DecodedFrames) -> Result<Tensor> {
    let dims = check_rgb("frames", m.count, m.width, m.height, &m.rgb)?;
    rgb8_to_planar(&m.rgb, dims, |v| v as f32 / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<Tensor>) -> &'static str {
        match r {
            Err(ClusterError::InvalidInput { field, .. }) => field,
            other => panic!("expected a refused field, got {other:?}"),
        }
    }

    #[test]
    fn latents_round_trip_and_hostile_shapes_are_refused() {
        let t = Tensor::new([1, 2, 1, 2, 3], (0..12).map(|x| x as f32 * 0.5 - 1.0).collect()).unwrap();
        let m = latents_message(&t).unwrap();
        assert_eq!((m.shape.as_slice(), m.data.len()), (&[2u32, 1, 2, 3][..], 48));
        assert_eq!(latents_from_message(&m).unwrap(), t);
        // Sizes from the network: products that overflow, or that do not match the bytes.
        for shape in [vec![u32::MAX, u32::MAX, u32::MAX, u32::MAX], vec![1 << 20, 1 << 20, 1, 1], vec![2, 1, 2, 2], vec![2, 1, 2]] {
            let hostile = pb::JobLatents { shape: shape.clone(), data: m.data.clone() };
            assert_eq!(field_of(latents_from_message(&hostile)), "latents", "{shape:?}");
        }
        let cp = pb::CheckpointResponse { latent_shape: vec![1, 2, 1, 2, 3], latents: m.data.clone(), ..Default::default() };
        assert_eq!(checkpoint_latents(&cp).unwrap(), t);
        let cp = pb::CheckpointResponse { latent_shape: vec![1, 1 << 31, 1 << 31, 1 << 31, 1 << 31], latents: vec![0; 7], ..Default::default() };
        assert_eq!(field_of(checkpoint_latents(&cp)), "resume.latents");
        assert!(latents_message(&Tensor::zeros([2, 1, 1, 1, 1])).is_err(), "a batch of two is not one job's latent");
    }

    /// Both frame messages round-trip to within one 8-bit level, in their own value ranges.
    #[test]
    fn frames_round_trip_through_rgb8() {
        let (f, h, w) = (2, 3, 4);
        let unit: Vec<f32> = (0..3 * f * h * w).map(|i| (i % 255) as f32 / 254.0).collect();
        let frames = Tensor::new([1, 3, f, h, w], unit.clone()).unwrap();
        let m = decoded_frames_message(&frames, 7).unwrap();
        assert_eq!((m.first_frame, m.count, m.width, m.height, m.rgb.len()), (7, 2, 4, 3, 72));
        // Frame 0, pixel 0, channel 1 sits at plane offset (1 * f + 0) * h * w.
        assert_eq!(m.rgb[1], (unit[f * h * w] * 255.0).round() as u8);
        for (a, b) in decoded_frames(&m).unwrap().data().iter().zip(&unit) {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6, "{a} vs {b}");
        }
        let signed: Vec<f32> = unit.iter().map(|x| x * 2.0 - 1.0).collect();
        let video = Tensor::new([1, 3, f, h, w], signed.clone()).unwrap();
        let m = input_frames_message(&video).unwrap();
        assert_eq!((m.frames, m.width, m.height), (2, 4, 3));
        for (a, b) in input_frames_video(&m).unwrap().data().iter().zip(&signed) {
            assert!((a - b).abs() <= 1.0 / 255.0 + 1e-6, "{a} vs {b}");
        }
    }

    /// Frame sizes from the internal API whose products overflow are refused naming the field,
    /// never wrapped into a size that matches the bytes sent.
    #[test]
    fn hostile_frame_sizes_are_refused() {
        let max = u32::MAX;
        for (frames, width, height, bytes) in [(max, max, max, 0), (1, 1 << 31, 1 << 31, 0), (0, 2, 2, 0), (1, 2, 2, 11)] {
            let m = pb::InputFrames { frames, width, height, rgb: vec![0; bytes] };
            assert_eq!(field_of(input_frames_video(&m)), "input_frames", "{frames}x{width}x{height}");
            let m = pb::DecodedFrames { first_frame: 0, count: frames, width, height, rgb: vec![0; bytes] };
            assert_eq!(field_of(decoded_frames(&m)), "frames", "{frames}x{width}x{height}");
        }
        let ok = input_frames_video(&pb::InputFrames { frames: 1, width: 2, height: 2, rgb: vec![255; 12] }).unwrap();
        assert_eq!((ok.shape(), ok.data()[0]), (&[1usize, 3, 1, 2, 2][..], 1.0));
    }
}
