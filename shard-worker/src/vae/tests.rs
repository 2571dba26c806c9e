//! Tests of the whole VAE: chunked decode and encode against one pass over the whole sequence,
//! causality, shapes, loading errors, and the real-width preset's activations.

use super::*;
use crate::weights::SafetensorsFile;
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;
use tessera_kernels::random::fill_normal;

fn golden_case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/vae/decode-a")
}

fn normal(shape: &[usize], stream: u64) -> Tensor {
    let mut v = vec![0.0f32; shape.iter().product()];
    fill_normal(7, stream, 0, &mut v);
    Tensor::new(shape.to_vec(), v).unwrap()
}

fn uniform_video(shape: &[usize], stream: u64) -> Tensor {
    let mut v = vec![0.0f32; shape.iter().product()];
    tessera_kernels::random::fill_uniform(7, stream, 0, &mut v);
    Tensor::new(shape.to_vec(), v).unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.data().iter().zip(b.data()) {
        d += ((x - y) as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

fn decode_in_chunks(vae: &WanVae, latent: &Tensor, chunk: usize) -> (Tensor, Vec<usize>) {
    let mut pieces = Vec::new();
    vae.decode_chunks(latent, chunk, &mut |t| {
        pieces.push(t);
        Ok(())
    })
    .unwrap();
    let sizes = pieces.iter().map(|p| p.dim(2)).collect();
    (concat_frames(&pieces).unwrap(), sizes)
}

#[test]
fn chunked_decode_equals_one_pass_over_the_sequence() {
    for vae in [WanVae::load(&golden_case()).unwrap(), WanVae::preset(VaePreset::Tiny, 3).unwrap()] {
        let z = vae.config().z_dim;
        let latent = normal(&[2, z, 4, 3, 2], 1);
        let (streamed, sizes) = decode_in_chunks(&vae, &latent, 1);
        assert_eq!(sizes, vec![1, 4, 4, 4]);
        assert_eq!(streamed.shape(), &[2, 3, 13, 24, 16]);
        assert_eq!(vae.decode(&latent).unwrap(), streamed);
        let (whole, sizes) = decode_in_chunks(&vae, &latent, usize::MAX);
        assert_eq!(sizes, vec![13]);
        let (pairs, sizes) = decode_in_chunks(&vae, &latent, 2);
        assert_eq!(sizes, vec![5, 8]);
        assert!(rel_l2(&streamed, &whole) < 1e-5, "{}", rel_l2(&streamed, &whole));
        assert!(rel_l2(&pairs, &whole) < 1e-5);
        // samples of a batch are independent
        let one = vae.decode(&Tensor::new([1, z, 4, 3, 2], latent.data()[..latent.len() / 2].to_vec()).unwrap()).unwrap();
        assert_eq!(one.data(), &streamed.data()[..streamed.len() / 2]);
        assert!(streamed.data().iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}

#[test]
fn decode_is_causal() {
    let vae = WanVae::preset(VaePreset::Tiny, 4).unwrap();
    let latent = normal(&[1, 4, 3, 2, 2], 2);
    let full = vae.decode(&latent).unwrap();
    let prefix = Tensor::new([1, 4, 2, 2, 2], (0..4).flat_map(|c| latent.data()[c * 12..c * 12 + 8].to_vec()).collect()).unwrap();
    let short = vae.decode(&prefix).unwrap();
    assert_eq!(short.shape(), &[1, 3, 5, 16, 16]);
    let plane = 16 * 16;
    for c in 0..3 {
        assert_eq!(&short.data()[c * 5 * plane..(c + 1) * 5 * plane], &full.data()[c * 9 * plane..(c * 9 + 5) * plane]);
    }
}

#[test]
fn chunked_encode_equals_one_pass_and_has_latent_shapes() {
    for vae in [WanVae::load(&golden_case()).unwrap(), WanVae::preset(VaePreset::Tiny, 5).unwrap()] {
        let z = vae.config().z_dim;
        let video = uniform_video(&[2, 3, 9, 16, 24], 3);
        let (mean, logvar) = vae.encode(&video).unwrap();
        assert_eq!(mean.shape(), &[2, z, 3, 2, 3]);
        assert_eq!(logvar.shape(), mean.shape());
        for (first, rest) in [(9, 4), (5, 4), (1, 8)] {
            let (m, l) = vae.encode_chunks(&video, first, rest, band::Tile::Whole).unwrap();
            assert!(rel_l2(&mean, &m) < 1e-5 && rel_l2(&logvar, &l) < 1e-5, "chunks {first}, {rest}");
        }
        let one = vae.encode(&Tensor::new([1, 3, 9, 16, 24], video.data()[..video.len() / 2].to_vec()).unwrap()).unwrap();
        assert_eq!(one.0.data(), &mean.data()[..mean.len() / 2]);
    }
}

#[test]
fn bad_inputs_are_refused_with_the_field_named() {
    let vae = WanVae::preset(VaePreset::Tiny, 6).unwrap();
    for bad in [vec![1, 5, 2, 2, 2], vec![1, 4, 0, 2, 2], vec![4, 2, 2, 2]] {
        let err = vae.decode(&Tensor::zeros(bad.clone())).unwrap_err().to_string();
        assert!(err.contains("latent"), "{bad:?}: {err}");
    }
    for bad in [vec![1, 3, 8, 16, 16], vec![1, 3, 5, 12, 16], vec![1, 4, 5, 16, 16], vec![3, 5, 16, 16]] {
        let err = vae.encode(&Tensor::zeros(bad.clone())).unwrap_err().to_string();
        assert!(err.contains("video"), "{bad:?}: {err}");
    }
    assert!(vae.normalize_latent(&Tensor::zeros([1, 3, 1, 1, 1])).is_err());
}

#[test]
fn latent_normalisation_round_trips() {
    let vae = WanVae::preset(VaePreset::Tiny, 6).unwrap();
    let mu = normal(&[2, 4, 2, 3, 3], 4);
    let z = vae.normalize_latent(&mu).unwrap();
    let c = vae.config();
    let (mean, std) = (c.latents_mean[1] as f32, c.latents_std[1] as f32);
    assert!((z.data()[18] - (mu.data()[18] - mean) / std).abs() < 1e-6);
    let back = vae.denormalize_latent(&z).unwrap();
    assert!(rel_l2(&back, &mu) < 1e-6);
}

/// All tensors of the golden case's weights file, as (name, shape, f32 values).
fn golden_weights() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let f = SafetensorsFile::open(&golden_case().join("diffusion_pytorch_model.safetensors")).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let (s, d) = f.read_f32(&n).unwrap();
            (n, s, d)
        })
        .collect()
}

fn write_case(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::copy(golden_case().join("config.json"), dir.join("config.json")).unwrap();
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().zip(&bytes).map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("diffusion_pytorch_model.safetensors")).unwrap();
}

#[test]
fn every_tensor_is_used_and_problems_are_named() {
    let all = golden_weights();
    let tmp = tempfile::tempdir().unwrap();
    write_case(tmp.path(), &all);
    assert!(WanVae::load(tmp.path()).is_ok());

    let missing = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight";
    let without: Vec<_> = all.iter().filter(|t| t.0 != missing).cloned().collect();
    write_case(tmp.path(), &without);
    let err = WanVae::load(tmp.path()).err().expect("missing tensor").to_string();
    assert!(err.contains(missing), "{err}");

    let mut extra = all.clone();
    extra.push(("encoder.down_blocks.2.time_conv.weight".into(), vec![8, 8, 3, 1, 1], vec![0.0; 192]));
    write_case(tmp.path(), &extra);
    let err = WanVae::load(tmp.path()).err().expect("unused tensor").to_string();
    assert!(err.contains("encoder.down_blocks.2.time_conv.weight"), "{err}");

    let mut reshaped = all.clone();
    let t = reshaped.iter_mut().find(|t| t.0 == "decoder.mid_block.attentions.0.norm.gamma").unwrap();
    t.1 = vec![t.1[0], 1, 1, 1];
    write_case(tmp.path(), &reshaped);
    let err = WanVae::load(tmp.path()).err().expect("mis-shaped tensor").to_string();
    assert!(err.contains("decoder.mid_block.attentions.0.norm.gamma") && err.contains("shape"), "{err}");
}

#[test]
fn real_width_preset_keeps_activations_finite_and_of_order_one() {
    let vae = WanVae::preset(VaePreset::Wan21, 0).unwrap();
    assert_eq!(vae.config().base_dim, 96);
    let WanVae::Cpu(m) = &vae else { panic!("presets load on the CPU") };
    let ops = m.ops();
    let latent = normal(&[1, 16, 2, 2, 3], 5);
    let z = m.post_quant_conv.forward(ops, band::Tile::Whole, &Clip::from_batch(ops, &latent, 0, 0, 2).unwrap()).unwrap();
    let raw = m.decoder.forward(ops, band::Tile::Whole, &z, &mut m.decoder.new_state()).unwrap();
    assert_eq!(raw.shape(), [3, 5, 16, 24]);
    let n = raw.buf.len() as f64;
    let rms = (raw.buf.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
    assert!(raw.buf.iter().all(|v| v.is_finite()));
    assert!((0.05..20.0).contains(&rms), "decoder output rms {rms}");
    let video = uniform_video(&[1, 3, 5, 16, 24], 6);
    let (mean, logvar) = vae.encode(&video).unwrap();
    assert_eq!(mean.shape(), &[1, 16, 2, 2, 3]);
    for t in [&mean, &logvar] {
        let rms = (t.data().iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / t.len() as f64).sqrt();
        assert!(t.data().iter().all(|v| v.is_finite()) && (0.05..20.0).contains(&rms), "encoder output rms {rms}");
    }
}
