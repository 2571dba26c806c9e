//! The bf16 transformer's orchestration, run through the host emulation of the CUDA kernels: every
//! golden transformer case at the CUDA bf16 tolerance, and agreement with the f32 CPU model on
//! configurations at the kernel's native head widths (no padding), text- and image-to-video.

use super::{CpuWanTransformer, EmulatedWanTransformer, LocalAttention};
use crate::golden::{Comparison, CUDA_BF16_TOLERANCE};
use crate::transformer_config::TransformerConfig;
use crate::weights::{RandomWeights, SafetensorsFile};
use crate::DitInputs;
use std::path::{Path, PathBuf};
use tessera_kernels::backend::{CpuOps, HostOps};
use tessera_kernels::random::fill_normal;
use tessera_kernels::Tensor;

fn dit_cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("case.json").is_file()).collect();
    cases.sort();
    assert!(cases.len() >= 4, "dit cases under {}", root.display());
    cases
}

fn read(io: &SafetensorsFile, name: &str) -> Tensor {
    let (shape, data) = io.read_f32(name).unwrap();
    Tensor::new(shape, data).unwrap()
}

#[test]
fn every_dit_case_passes_in_emulated_bf16() {
    for dir in dit_cases() {
        let io = SafetensorsFile::open(&dir.join("io.safetensors")).unwrap();
        let (hidden, text) = (read(&io, "hidden_states"), read(&io, "encoder_hidden_states"));
        let image = io.contains("encoder_hidden_states_image").then(|| read(&io, "encoder_hidden_states_image"));
        let (_, timesteps) = io.read_f32("timestep").unwrap();
        let x = DitInputs {
            hidden_states: &hidden,
            timesteps: &timesteps,
            encoder_hidden_states: &text,
            encoder_hidden_states_image: image.as_ref(),
            options: crate::golden::forward_options(&io).unwrap(),
        };
        let model = EmulatedWanTransformer::load(HostOps, &dir).unwrap();
        let out = model.forward(&x).unwrap();
        let want = read(&io, "output");
        assert_eq!(out.shape(), want.shape());
        let c = Comparison::new(out.data(), want.data(), &CUDA_BF16_TOLERANCE);
        println!("{}: emulated bf16 rel_l2 {:.3e}, max_abs {:.3e} (max |ref| {:.3})", dir.display(), c.rel_l2, c.max_abs, c.max_ref);
        assert!(c.passed, "{}: {c:?}", dir.display());
        // The bf16 data flow really rounds: an f32-exact result would mean the roundings are gone.
        assert!(c.rel_l2 > 2e-4, "{}: rel_l2 {:.3e} is f32-level", dir.display(), c.rel_l2);
    }
}

fn random(shape: &[usize], stream: u64) -> Tensor {
    let mut d = vec![0.0; shape.iter().product()];
    fill_normal(11, stream, 0, &mut d);
    Tensor::new(shape.to_vec(), d).unwrap()
}

/// 2 heads of `head_dim`, 2 layers, small widths; image-to-video when `image_dim` is given.
fn config(head_dim: usize, image_dim: Option<usize>) -> TransformerConfig {
    let d = 2 * head_dim;
    TransformerConfig {
        patch_size: [1, 2, 2],
        num_attention_heads: 2,
        attention_head_dim: head_dim,
        in_channels: 8,
        out_channels: 4,
        text_dim: 48,
        freq_dim: 32,
        ffn_dim: 3 * d,
        num_layers: 2,
        cross_attn_norm: true,
        qk_norm: Some("rms_norm_across_heads".into()),
        eps: 1e-6,
        image_dim,
        added_kv_proj_dim: image_dim.map(|_| d),
        rope_max_seq_len: 64,
        pos_embed_seq_len: None,
        ..TransformerConfig::wan21(2, 8, 2)
    }
}

fn compare_with_cpu(cfg: TransformerConfig, latent: [usize; 3], batch: usize) {
    let src = RandomWeights::new(5);
    let cpu = CpuWanTransformer::from_source(CpuOps, cfg.clone(), &src).unwrap();
    let emu = EmulatedWanTransformer::from_source(HostOps, cfg.clone(), &src).unwrap();
    let hidden = random(&[batch, cfg.in_channels, latent[0], latent[1], latent[2]], 1);
    let text = random(&[batch, 20, cfg.text_dim], 2);
    let image = cfg.image_dim.map(|d| random(&[batch, 7, d], 3));
    let timesteps: Vec<f32> = (0..batch).map(|i| 900.0 - 350.0 * i as f32).collect();
    let x = DitInputs {
        hidden_states: &hidden,
        timesteps: &timesteps,
        encoder_hidden_states: &text,
        encoder_hidden_states_image: image.as_ref(),
        options: Default::default(),
    };
    let want = cpu.forward(&x).unwrap();
    let got = emu.forward_with(&x, &LocalAttention).unwrap();
    let c = Comparison::new(got.data(), want.data(), &CUDA_BF16_TOLERANCE);
    println!("head_dim {} image {:?}: emulated bf16 vs CPU f32 rel_l2 {:.3e}, max_abs {:.3e}", cfg.attention_head_dim, cfg.image_dim, c.rel_l2, c.max_abs);
    assert!(c.passed && c.rel_l2 > 1e-4, "{c:?}");
}

#[test]
fn emulated_bf16_matches_cpu_at_native_head_widths() {
    compare_with_cpu(config(64, None), [3, 4, 6], 2);
    compare_with_cpu(config(128, Some(24)), [2, 6, 4], 1);
}

#[test]
fn bad_token_ranges_and_head_dims_are_errors() {
    let cfg = config(64, None);
    let src = RandomWeights::new(1);
    let emu = EmulatedWanTransformer::from_source(HostOps, cfg.clone(), &src).unwrap();
    let hidden = random(&[1, cfg.in_channels, 1, 4, 4], 1);
    let text = random(&[1, 3, cfg.text_dim], 2);
    let x =
        DitInputs { hidden_states: &hidden, timesteps: &[10.0], encoder_hidden_states: &text, encoder_hidden_states_image: None, options: Default::default() };
    let (_, grid) = emu.check_inputs(&x).unwrap();
    let cond = emu.embed_conditions(&x).unwrap();
    assert!(emu.forward_tokens(&x, &cond, 0, &grid, 2..5, &LocalAttention).is_err(), "past the 4 tokens");
    assert!(emu.forward_tokens(&x, &cond, 1, &grid, 0..4, &LocalAttention).is_err(), "no sample 1");
    let rows = emu.forward_tokens(&x, &cond, 0, &grid, 1..3, &LocalAttention).unwrap();
    assert_eq!(rows.len(), 2 * cfg.patch_out());
    // Heads the GPU kernels do not take (flash: 64 and 128, padded from narrower; wide: multiples
    // of 8 up to 512) are refused at load, before any forward.
    for hd in [132, 520] {
        let err = EmulatedWanTransformer::from_source(HostOps, config(hd, None), &src).err().expect("head_dim refused").to_string();
        assert!(err.contains(&format!("attention_head_dim {hd}")), "{err}");
    }
}
