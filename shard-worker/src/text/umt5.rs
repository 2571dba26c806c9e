//! transformers' `UMT5EncoderModel`: token embedding, pre-norm blocks of relative-position
//! self-attention and a gated-GELU feed-forward, final RMSNorm (reference §3).

use super::config::Umt5Config;
use super::relative::{bias_by_head, biased_attention, bucket_table, QkvLayout, Segment};
use crate::model::Linear;
use crate::weights::{WeightSource, WeightStore};
use crate::{Result, WorkerError};
use rayon::prelude::*;
use std::path::Path;
use tessera_kernels::cpu::{self, Activation};
use tessera_kernels::Tensor;

/// The input embedding's name in transformers' checkpoints.
const SHARED: &str = "shared.weight";
/// The encoder's own, tied copy of it, which some checkpoints also store.
const ENCODER_EMBED: &str = "encoder.embed_tokens.weight";

/// One encoder block (`encoder.block.{i}`).
struct Umt5Block {
    attn_norm: Vec<f32>,
    /// q, k and v stacked: `[3·inner, d_model]`.
    qkv: Linear,
    out: Linear,
    /// `relative_attention_bias.weight` `[num_buckets, heads]`.
    position_bias: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// `wi_0` (GELU branch) and `wi_1` stacked: `[2·d_ff, d_model]`.
    wi: Linear,
    wo: Linear,
}

impl Umt5Block {
    fn load(src: &dyn WeightSource, cfg: &Umt5Config, i: usize) -> Result<Self> {
        let (d, inner, ff) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
        let p = format!("encoder.block.{i}.layer");
        let attn = format!("{p}.0.SelfAttention");
        let mut qkv = Vec::with_capacity(3 * inner * d);
        for name in ["q", "k", "v"] {
            qkv.extend(src.tensor(&format!("{attn}.{name}.weight"), &[inner, d])?);
        }
        let mut wi = Vec::with_capacity(2 * ff * d);
        for name in ["wi_0", "wi_1"] {
            wi.extend(src.tensor(&format!("{p}.1.DenseReluDense.{name}.weight"), &[ff, d])?);
        }
        Ok(Self {
            attn_norm: src.tensor(&format!("{p}.0.layer_norm.weight"), &[d])?,
            qkv: Linear::from_parts(qkv, None, d, 3 * inner),
            out: Linear::from_parts(src.tensor(&format!("{attn}.o.weight"), &[d, inner])?, None, inner, d),
            position_bias: src.tensor(&format!("{attn}.relative_attention_bias.weight"), &[cfg.relative_attention_num_buckets, cfg.num_heads])?,
            ffn_norm: src.tensor(&format!("{p}.1.layer_norm.weight"), &[d])?,
            wi: Linear::from_parts(wi, None, d, 2 * ff),
            wo: Linear::from_parts(src.tensor(&format!("{p}.1.DenseReluDense.wo.weight"), &[d, ff])?, None, ff, d),
        })
    }

    /// `h ← h + o(attn(norm(h)))`, then `h ← h + wo(gelu(wi_0·x) ⊙ wi_1·x)` with `x = norm(h)`.
    fn forward(&self, h: &mut [f32], cfg: &Umt5Config, run: &SegmentRun<'_>) -> Result<()> {
        let (rows, eps) = (h.len() / cfg.d_model, cfg.layer_norm_epsilon as f32);
        let mut x = h.to_vec();
        cpu::rms_norm(&mut x, &self.attn_norm, eps)?;
        let qkv = self.qkv.forward(&x, rows, Activation::None)?;
        let bias = bias_by_head(&self.position_bias, cfg.num_heads, &run.buckets);
        let layout = QkvLayout { heads: cfg.num_heads, d_kv: cfg.d_kv };
        let attn = biased_attention(&qkv, layout, run.segments, &bias, run.max_len, run.mask_add.as_deref());
        drop(qkv);
        cpu::residual_add(h, &self.out.forward(&attn, rows, Activation::None)?)?;

        x.copy_from_slice(h);
        cpu::rms_norm(&mut x, &self.ffn_norm, eps)?;
        let both = self.wi.forward(&x, rows, Activation::None)?;
        drop(x);
        let ff = cfg.d_ff;
        let mut gated = vec![0.0f32; rows * ff];
        gated.par_chunks_mut(ff).zip(both.par_chunks(2 * ff)).for_each(|(g, row)| {
            g.copy_from_slice(&row[..ff]);
            cpu::apply_activation(g, Activation::GeluTanh);
            for (a, &b) in g.iter_mut().zip(&row[ff..]) {
                *a *= b;
            }
        });
        drop(both);
        cpu::residual_add(h, &self.wo.forward(&gated, rows, Activation::None)?)?;
        Ok(())
    }
}

/// What every layer of one forward pass shares: the segments, their relative buckets, the mask.
struct SegmentRun<'a> {
    segments: &'a [Segment],
    max_len: usize,
    buckets: Vec<usize>,
    /// 0 for keys to attend to, `f32::MIN` for padding (per token row); `None`: no padding.
    mask_add: Option<Vec<f32>>,
}

/// The UMT5 encoder (transformers `UMT5EncoderModel`), in f32 on the CPU.
pub struct Umt5EncoderModel {
    cfg: Umt5Config,
    /// `[vocab, d_model]`.
    embedding: Vec<f32>,
    blocks: Vec<Umt5Block>,
    final_norm: Vec<f32>,
}

impl Umt5EncoderModel {
    /// Loads a transformers folder: `config.json` and `model.safetensors` (or shards with
    /// `model.safetensors.index.json`). Every tensor in the files must be used.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = Umt5Config::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir)?;
        Self::from_source(cfg, &store)
    }

    /// Builds the encoder from any weight source (files, or random weights for benchmarks),
    /// then checks that the source holds nothing else.
    ///
    /// The embedding is `shared.weight`; checkpoints may also hold the encoder's tied copy
    /// `encoder.embed_tokens.weight`, which is then used to fill in for a missing `shared.weight`
    /// or must be identical to it (two different tables would make the model ambiguous).
    pub fn from_source(cfg: Umt5Config, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "UMT5 config".into(), detail })?;
        let embedding = Self::load_embedding(&cfg, src)?;
        let blocks = (0..cfg.num_layers).map(|i| Umt5Block::load(src, &cfg, i)).collect::<Result<Vec<_>>>()?;
        let final_norm = src.tensor("encoder.final_layer_norm.weight", &[cfg.d_model])?;
        src.finish()?;
        Ok(Self { cfg, embedding, blocks, final_norm })
    }

    fn load_embedding(cfg: &Umt5Config, src: &dyn WeightSource) -> Result<Vec<f32>> {
        let shape = [cfg.vocab_size, cfg.d_model];
        if !src.contains(SHARED) && src.contains(ENCODER_EMBED) {
            return src.tensor(ENCODER_EMBED, &shape);
        }
        let shared = src.tensor(SHARED, &shape)?;
        if src.contains(ENCODER_EMBED) {
            let tied = src.tensor(ENCODER_EMBED, &shape)?;
            if tied != shared {
                return Err(WorkerError::BadTensor {
                    name: ENCODER_EMBED.into(),
                    detail: format!("differs from {SHARED}; the two are tied in UMT5EncoderModel and must be equal"),
                });
            }
        }
        Ok(shared)
    }

    /// The configuration.
    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// transformers' forward: `input_ids` `[batch, len]` (row-major) with `attention_mask`
    /// (`false` for padding, which is masked as a key in every layer) → `last_hidden_state`
    /// `[batch, len, d_model]`. Rows of padding tokens are computed as upstream does, but
    /// nothing downstream should use them.
    pub fn forward(&self, input_ids: &[u32], attention_mask: &[bool], batch: usize) -> Result<Tensor> {
        if input_ids.len().checked_rem(batch) != Some(0) {
            return Err(WorkerError::input("input_ids", format!("{} ids are not {batch} rows", input_ids.len())));
        }
        if attention_mask.len() != input_ids.len() {
            return Err(WorkerError::input("attention_mask", format!("{} entries for {} ids", attention_mask.len(), input_ids.len())));
        }
        let len = input_ids.len() / batch;
        let segments: Vec<Segment> = (0..batch).map(|b| Segment { start: b * len, len }).collect();
        let mask_add = attention_mask.iter().map(|&keep| if keep { 0.0 } else { f32::MIN }).collect();
        let hidden = self.run(input_ids, &segments, Some(mask_add))?;
        Ok(Tensor::new([batch, len, self.cfg.d_model], hidden)?)
    }

    /// Each sequence on its own, with no padding: `[len_i, d_model]` per sequence. Equal to the
    /// rows `0..len_i` of [`Self::forward`] on the right-padded batch with a prefix mask, since
    /// masked keys get no weight and the relative bias depends only on distances.
    pub fn encode_unpadded(&self, sequences: &[&[u32]]) -> Result<Vec<Tensor>> {
        let mut ids = Vec::with_capacity(sequences.iter().map(|s| s.len()).sum());
        let mut segments = Vec::with_capacity(sequences.len());
        for s in sequences {
            segments.push(Segment { start: ids.len(), len: s.len() });
            ids.extend_from_slice(s);
        }
        let hidden = self.run(&ids, &segments, None)?;
        let d = self.cfg.d_model;
        segments.iter().map(|s| Ok(Tensor::new([s.len, d], hidden[s.start * d..(s.start + s.len) * d].to_vec())?)).collect()
    }

    /// The encoder on token rows grouped into segments that attend only within themselves.
    fn run(&self, ids: &[u32], segments: &[Segment], mask_add: Option<Vec<f32>>) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let mut h = vec![0.0f32; ids.len() * d];
        for (row, &id) in h.chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            if id >= self.cfg.vocab_size {
                return Err(WorkerError::input("input_ids", format!("token id {id} is outside the vocabulary of {}", self.cfg.vocab_size)));
            }
            row.copy_from_slice(&self.embedding[id * d..(id + 1) * d]);
        }
        if ids.is_empty() {
            return Ok(h);
        }
        let max_len = segments.iter().map(|s| s.len).max().unwrap_or(0).max(1);
        let run = SegmentRun {
            segments,
            max_len,
            buckets: bucket_table(max_len, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance),
            mask_add,
        };
        for block in &self.blocks {
            block.forward(&mut h, &self.cfg, &run)?;
        }
        cpu::rms_norm(&mut h, &self.final_norm, self.cfg.layer_norm_epsilon as f32)?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::SafetensorsFile;
    use safetensors::tensor::{Dtype, TensorView};
    use std::path::PathBuf;

    fn golden_case() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/umt5/enc-a")
    }

    /// The case's ids and mask, `[2, 11]`.
    fn golden_inputs() -> (Vec<u32>, Vec<bool>) {
        let io = SafetensorsFile::open(&golden_case().join("io.safetensors")).unwrap();
        let (_, ids) = io.read_i64("input_ids").unwrap();
        let (_, mask) = io.read_i64("attention_mask").unwrap();
        (ids.iter().map(|&i| i as u32).collect(), mask.iter().map(|&m| m != 0).collect())
    }

    /// A copy of the golden model folder whose weights are `edit`ed (name → f32 data).
    fn edited_copy(edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> tempfile::TempDir {
        let src = golden_case();
        let file = SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
            .names()
            .into_iter()
            .map(|n| {
                let (s, d) = file.read_f32(&n).unwrap();
                (n, s, d)
            })
            .collect();
        edit(&mut tensors);
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().zip(&bytes).map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        let tmp = tempfile::tempdir().unwrap();
        safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        tmp
    }

    fn load_error(dir: &Path) -> String {
        Umt5EncoderModel::load(dir).err().expect("loading must fail").to_string()
    }

    #[test]
    fn unpadded_sequences_equal_the_masked_padded_batch() {
        let model = Umt5EncoderModel::load(&golden_case()).unwrap();
        let (ids, mask) = golden_inputs();
        let len = ids.len() / 2;
        let start = std::time::Instant::now();
        let padded = model.forward(&ids, &mask, 2).unwrap();
        let padded_time = start.elapsed();
        let d = model.config().d_model;
        let lengths: Vec<usize> = mask.chunks(len).map(|m| m.iter().filter(|&&k| k).count()).collect();
        assert_eq!(lengths, vec![11, 6]);
        let seqs: Vec<&[u32]> = ids.chunks(len).zip(&lengths).map(|(row, &n)| &row[..n]).collect();
        let start = std::time::Instant::now();
        let alone = model.encode_unpadded(&seqs).unwrap();
        eprintln!("umt5/enc-a: padded + masked forward {padded_time:?}, unpadded {:?}", start.elapsed());
        for (b, t) in alone.iter().enumerate() {
            assert_eq!(t.shape(), &[lengths[b], d]);
            let kept = &padded.data()[b * len * d..(b * len + lengths[b]) * d];
            let worst = t.data().iter().zip(kept).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "sequence {b}: unpadded differs from masked by {worst}");
        }
        // Without the mask the padding would be attended to and change the kept rows.
        let unmasked = model.forward(&ids, &[true; 22], 2).unwrap();
        let kept = &unmasked.data()[len * d..(len + 6) * d];
        let worst = alone[1].data().iter().zip(kept).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst > 1e-3, "the mask must matter: {worst}");
    }

    #[test]
    fn missing_and_extra_tensors_are_named() {
        let dir = edited_copy(|t| t.retain(|(n, _, _)| n != "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"));
        let err = load_error(dir.path());
        assert!(err.contains("missing tensor `encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight`"), "{err}");

        let dir = edited_copy(|t| t.push(("encoder.block.0.layer.0.SelfAttention.q.bias".into(), vec![32], vec![0.0; 32])));
        let err = load_error(dir.path());
        assert!(err.contains("unexpected tensors") && err.contains("q.bias"), "{err}");

        let dir = edited_copy(|t| {
            let w = t.iter_mut().find(|(n, _, _)| n == "encoder.final_layer_norm.weight").unwrap();
            w.1 = vec![16];
            w.2.truncate(16);
        });
        let err = load_error(dir.path());
        assert!(err.contains("encoder.final_layer_norm.weight") && err.contains("expected shape [32]"), "{err}");
    }

    #[test]
    fn tied_embedding_copies_are_accepted_only_when_equal() {
        let (ids, mask) = golden_inputs();
        let reference = Umt5EncoderModel::load(&golden_case()).unwrap().forward(&ids, &mask, 2).unwrap();
        let shared = |t: &Vec<(String, Vec<usize>, Vec<f32>)>| t.iter().find(|(n, _, _)| n == SHARED).unwrap().clone();

        // both stored, identical: loads, and every tensor counts as used
        let dir = edited_copy(|t| {
            let (_, s, d) = shared(t);
            t.push((ENCODER_EMBED.into(), s, d));
        });
        assert_eq!(Umt5EncoderModel::load(dir.path()).unwrap().forward(&ids, &mask, 2).unwrap(), reference);

        // only the encoder's copy stored
        let dir = edited_copy(|t| {
            let (_, s, d) = shared(t);
            t.retain(|(n, _, _)| n != SHARED);
            t.push((ENCODER_EMBED.into(), s, d));
        });
        assert_eq!(Umt5EncoderModel::load(dir.path()).unwrap().forward(&ids, &mask, 2).unwrap(), reference);

        // both stored, different: refused
        let dir = edited_copy(|t| {
            let (_, s, mut d) = shared(t);
            d[5] += 1.0;
            t.push((ENCODER_EMBED.into(), s, d));
        });
        assert!(load_error(dir.path()).contains("differs from shared.weight"));

        // neither: the missing tensor is `shared.weight`
        let dir = edited_copy(|t| t.retain(|(n, _, _)| n != SHARED));
        assert!(load_error(dir.path()).contains("missing tensor `shared.weight`"));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = Umt5EncoderModel::load(&golden_case()).unwrap();
        assert!(model.forward(&[1, 2, 3], &[true; 3], 2).is_err());
        assert!(model.forward(&[1, 2], &[true; 3], 1).is_err());
        let err = model.encode_unpadded(&[&[1, 200]]).err().unwrap().to_string();
        assert!(err.contains("token id 200"), "{err}");
        let empty = model.encode_unpadded(&[&[]]).unwrap();
        assert_eq!(empty[0].shape(), &[0, 32]);
    }

    /// One layer at UMT5-XXL width (d_model 4096, 64 heads of 64, d_ff 10240) with random
    /// weights: prints the time per layer for a few prompt lengths (×24 for the whole encoder).
    /// `cargo test -p tessera-worker --lib umt5_xxl_layer_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; allocates ~2 GB"]
    fn umt5_xxl_layer_timing() {
        let cfg = Umt5Config { num_layers: 1, vocab_size: 1000, ..Umt5Config::umt5_xxl() };
        let model = Umt5EncoderModel::from_source(cfg, &crate::weights::RandomWeights::new(7)).unwrap();
        for len in [25usize, 100, 512] {
            let ids: Vec<u32> = (0..len as u32).map(|i| (i * 37) % 1000).collect();
            model.encode_unpadded(&[&ids]).unwrap(); // warm-up
            let runs = 3;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                let out = model.encode_unpadded(&[&ids]).unwrap();
                assert!(out[0].data().iter().all(|x| x.is_finite()));
            }
            let per_layer = start.elapsed().as_secs_f64() / runs as f64;
            eprintln!("UMT5-XXL width, {len} tokens: {:.1} ms per layer, ~{:.2} s for 24 layers", per_layer * 1e3, per_layer * 24.0);
        }
    }
}
