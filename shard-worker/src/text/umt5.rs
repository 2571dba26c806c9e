//! transformers' `UMT5EncoderModel`: token embedding, pre-norm blocks of relative-position
//! self-attention and a gated-GELU feed-forward, final RMSNorm (reference §3). Written once over
//! the backend seam ([`Ops`]): f32 on the CPU, bf16 on a GPU and under its host twin (as
//! transformers runs the encoder in bf16: the residual stream stored in bf16, norms and softmax in
//! f32).

use super::config::Umt5Config;
use super::relative::{bias_by_head, bucket_table, Segment};
use crate::model::{load_rounded, round_to, DeviceLinear};
use crate::on_backend::{model_family, on_backend, OnBackend};
use crate::weights::{WeightSource, WeightStore};
use crate::{Result, WorkerError};
use std::path::Path;
use tessera_kernels::backend::{at, at_mut, ActBuf, Backend, Elem, Ops};
use tessera_kernels::cpu::{Activation, AttentionShape};
use tessera_kernels::Tensor;

/// The input embedding's name in transformers' checkpoints.
const SHARED: &str = "shared.weight";
/// The encoder's own, tied copy of it, which some checkpoints also store.
const ENCODER_EMBED: &str = "encoder.embed_tokens.weight";

/// One encoder block (`encoder.block.{i}`) on the backend's device.
struct Umt5Block<O: Ops> {
    attn_norm: O::Buf<f32>,
    /// q, k and v stacked: `[3·inner, d_model]`.
    qkv: DeviceLinear<O>,
    out: DeviceLinear<O>,
    /// `relative_attention_bias.weight` `[num_buckets, heads]` (host; values as `Act` holds them).
    position_bias: Vec<f32>,
    ffn_norm: O::Buf<f32>,
    /// `wi_0`, whose output goes through GELU (fused in the product).
    wi_gelu: DeviceLinear<O>,
    /// `wi_1`, the linear branch.
    wi_linear: DeviceLinear<O>,
    wo: DeviceLinear<O>,
}

impl<O: Ops> Umt5Block<O> {
    fn load(ops: &O, src: &dyn WeightSource, cfg: &Umt5Config, i: usize) -> Result<Self> {
        let (d, inner, ff) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
        let p = format!("encoder.block.{i}.layer");
        let attn = format!("{p}.0.SelfAttention");
        let dense = format!("{p}.1.DenseReluDense");
        let qkv = ["q", "k", "v"].map(|n| format!("{attn}.{n}.weight"));
        let mut position_bias = src.tensor(&format!("{attn}.relative_attention_bias.weight"), &[cfg.relative_attention_num_buckets, cfg.num_heads])?;
        round_to::<O::Act>(&mut position_bias);
        Ok(Self {
            attn_norm: load_rounded(ops, src, &format!("{p}.0.layer_norm.weight"), &[d])?,
            qkv: DeviceLinear::load_unbiased(ops, src, &qkv.each_ref().map(String::as_str), d, inner)?,
            out: DeviceLinear::load_unbiased(ops, src, &[&format!("{attn}.o.weight")], inner, d)?,
            position_bias,
            ffn_norm: load_rounded(ops, src, &format!("{p}.1.layer_norm.weight"), &[d])?,
            wi_gelu: DeviceLinear::load_unbiased(ops, src, &[&format!("{dense}.wi_0.weight")], d, ff)?,
            wi_linear: DeviceLinear::load_unbiased(ops, src, &[&format!("{dense}.wi_1.weight")], d, ff)?,
            wo: DeviceLinear::load_unbiased(ops, src, &[&format!("{dense}.wo.weight")], ff, d)?,
        })
    }

    /// `h ← h + o(attn(norm(h)))`, then `h ← h + wo(gelu(wi_0·x) ⊙ wi_1·x)` with `x = norm(h)`.
    fn forward(&self, ops: &O, cfg: &Umt5Config, run: &SegmentRun<'_, O>, ws: &mut Workspace<O>) -> Result<()> {
        let (d, inner, ff) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
        let (rows, eps) = (ws.rows, cfg.layer_norm_epsilon as f32);
        ops.rms_norm(&ws.x, rows, d, &self.attn_norm, eps, &mut ws.h)?;
        self.qkv.forward(ops, at(&ws.h, 0), rows, Activation::None, at_mut(&mut ws.wide, 0))?;
        let bias = ops.upload(&bias_by_head(&self.position_bias, cfg.num_heads, &run.buckets))?;
        let pitch = 2 * run.max_len - 1;
        for seg in run.segments.iter().filter(|s| s.len > 0) {
            let (n, qkv) = (seg.len, seg.start * 3 * inner);
            let shape = AttentionShape { heads: cfg.num_heads, head_dim: cfg.d_kv, q_len: n, kv_len: n, q_stride: 3 * inner, kv_stride: 3 * inner };
            // Bias index j − i + n − 1 of this segment is j − i + max_len − 1 of the table.
            let (rel, mask) = (at(&bias, run.max_len - n), run.mask.as_ref().map(|m| at(m, seg.start)));
            let (q, k, v) = (at(&ws.wide, qkv), at(&ws.wide, qkv + inner), at(&ws.wide, qkv + 2 * inner));
            ops.biased_attention(q, k, v, shape, 1.0, rel, pitch, mask, at_mut(&mut ws.attn, seg.start * inner), inner)?;
        }
        self.out.forward(ops, at(&ws.attn, 0), rows, Activation::None, at_mut(&mut ws.h, 0))?;
        ws.add_residual(ops, rows * d)?;

        ops.rms_norm(&ws.x, rows, d, &self.ffn_norm, eps, &mut ws.h)?;
        self.wi_gelu.forward(ops, at(&ws.h, 0), rows, Activation::GeluTanh, at_mut(&mut ws.wide, 0))?;
        self.wi_linear.forward(ops, at(&ws.h, 0), rows, Activation::None, at_mut(&mut ws.attn_wide, 0))?;
        ops.mul(at_mut(&mut ws.wide, 0), at(&ws.attn_wide, 0), rows * ff)?;
        self.wo.forward(ops, at(&ws.wide, 0), rows, Activation::None, at_mut(&mut ws.h, 0))?;
        ws.add_residual(ops, rows * d)
    }
}

/// Buffers of one forward over `rows` token rows, reused by every block.
struct Workspace<O: Ops> {
    rows: usize,
    /// The residual stream `[rows, d_model]`, f32 (holding `Act` values).
    x: O::Buf<f32>,
    /// Normalised rows `[rows, d_model]`, also the output of each branch.
    h: ActBuf<O>,
    /// q|k|v `[rows, 3·inner]`, then the GELU branch `[rows, d_ff]`.
    wide: ActBuf<O>,
    /// Attention output `[rows, inner]`, then the linear branch `[rows, d_ff]`.
    attn_wide: ActBuf<O>,
    /// The attention output `[rows, inner]`.
    attn: ActBuf<O>,
}

impl<O: Ops> Workspace<O> {
    fn new(ops: &O, cfg: &Umt5Config, rows: usize) -> Result<Self> {
        let (d, inner, ff) = (cfg.d_model, cfg.inner_dim(), cfg.d_ff);
        Ok(Self {
            rows,
            x: ops.zeros(rows * d)?,
            h: ops.zeros(rows * d)?,
            wide: ops.zeros(rows * (3 * inner).max(ff))?,
            attn_wide: ops.zeros(rows * ff)?,
            attn: ops.zeros(rows * inner)?,
        })
    }

    /// `x ← Act(x + h)` over `n` values (transformers adds in the model's dtype).
    fn add_residual(&mut self, ops: &O, n: usize) -> Result<()> {
        ops.add(at_mut(&mut self.x, 0), at(&self.h, 0), None, n, n)?;
        crate::model::round_stream(ops, &mut self.x, &mut self.h, n)
    }
}

/// What every layer of one forward pass shares: the segments, their relative buckets, the mask.
struct SegmentRun<'a, O: Ops> {
    segments: &'a [Segment],
    max_len: usize,
    buckets: Vec<usize>,
    /// 0 for keys to attend to, `f32::MIN` for padding (per token row); `None`: no padding.
    mask: Option<O::Buf<f32>>,
}

/// The UMT5 encoder on the backend `O` (transformers `UMT5EncoderModel`).
pub struct Umt5Encoder<O: Ops> {
    ops: O,
    cfg: Umt5Config,
    /// `[vocab, d_model]`.
    embedding: ActBuf<O>,
    blocks: Vec<Umt5Block<O>>,
    final_norm: O::Buf<f32>,
}

impl<O: Ops> Umt5Encoder<O> {
    /// Builds the encoder on `ops` from any weight source (files, or random weights for
    /// benchmarks), then checks that the source holds nothing else.
    ///
    /// The embedding is `shared.weight`; checkpoints may also hold the encoder's tied copy
    /// `encoder.embed_tokens.weight`, which is then used to fill in for a missing `shared.weight`
    /// or must be identical to it (two different tables would make the model ambiguous).
    pub fn from_source(ops: O, cfg: Umt5Config, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "UMT5 config".into(), detail })?;
        let embedding = ops.upload_vec(O::Act::vec_from_f32(load_embedding(&cfg, src)?))?;
        let blocks = (0..cfg.num_layers).map(|i| Umt5Block::load(&ops, src, &cfg, i)).collect::<Result<Vec<_>>>()?;
        let final_norm = load_rounded(&ops, src, "encoder.final_layer_norm.weight", &[cfg.d_model])?;
        src.finish()?;
        Ok(Self { ops, cfg, embedding, blocks, final_norm })
    }

    /// The configuration.
    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// The backend.
    pub fn ops(&self) -> &O {
        &self.ops
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
        let mask: Vec<f32> = attention_mask.iter().map(|&keep| if keep { 0.0 } else { f32::MIN }).collect();
        let hidden = self.run(input_ids, &segments, Some(mask))?;
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
    fn run(&self, ids: &[u32], segments: &[Segment], mask: Option<Vec<f32>>) -> Result<Vec<f32>> {
        let (ops, d) = (&self.ops, self.cfg.d_model);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(WorkerError::input("input_ids", format!("token id {id} is outside the vocabulary of {}", self.cfg.vocab_size)));
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut ws = Workspace::new(ops, &self.cfg, ids.len())?;
        for (row, &id) in ids.iter().enumerate() {
            ops.copy_rows(at(&self.embedding, id as usize * d), d, at_mut(&mut ws.h, row * d), d, d, 1)?;
        }
        ops.widen(at(&ws.h, 0), at_mut(&mut ws.x, 0), ids.len() * d)?;
        let max_len = segments.iter().map(|s| s.len).max().unwrap_or(0).max(1);
        let run = SegmentRun {
            segments,
            max_len,
            buckets: bucket_table(max_len, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance),
            mask: mask.map(|m| ops.upload(&m)).transpose()?,
        };
        for block in &self.blocks {
            block.forward(ops, &self.cfg, &run, &mut ws)?;
        }
        ops.rms_norm(&ws.x, ids.len(), d, &self.final_norm, self.cfg.layer_norm_epsilon as f32, &mut ws.h)?;
        ops.widen(at(&ws.h, 0), at_mut(&mut ws.x, 0), ids.len() * d)?;
        Ok(ops.download(&ws.x)?)
    }
}

/// `shared.weight`, or the encoder's tied copy (see [`Umt5Encoder::from_source`]).
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

model_family!(
    /// The UMT5 encoder as a [`ModelFamily`](crate::on_backend::ModelFamily): what [`Umt5EncoderModel`] chooses among.
    Umt5Family,
    Umt5Encoder,
    Umt5Config
);

/// The UMT5 encoder on the backend chosen at run time (`from_source_on`, `backend` and
/// `device_memory` come with [`OnBackend`]).
pub type Umt5EncoderModel = OnBackend<Umt5Family>;

impl OnBackend<Umt5Family> {
    /// Loads a transformers folder (`config.json` and `model.safetensors`, or shards with
    /// `model.safetensors.index.json`) onto the CPU in f32. Every tensor in the files must be used.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, Backend::Cpu)
    }

    /// [`load`](Self::load) onto `backend`.
    pub fn load_on(dir: &Path, backend: Backend) -> Result<Self> {
        let cfg = Umt5Config::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir)?;
        Self::from_source_on(cfg, &store, backend)
    }

    /// The encoder on the CPU from any weight source (see [`Umt5Encoder::from_source`]).
    pub fn from_source(cfg: Umt5Config, src: &dyn WeightSource) -> Result<Self> {
        Self::from_source_on(cfg, src, Backend::Cpu)
    }

    /// The configuration.
    pub fn config(&self) -> &Umt5Config {
        on_backend!(self, m => m.config())
    }

    /// See [`Umt5Encoder::forward`].
    pub fn forward(&self, input_ids: &[u32], attention_mask: &[bool], batch: usize) -> Result<Tensor> {
        on_backend!(self, m => m.forward(input_ids, attention_mask, batch))
    }

    /// See [`Umt5Encoder::encode_unpadded`].
    pub fn encode_unpadded(&self, sequences: &[&[u32]]) -> Result<Vec<Tensor>> {
        on_backend!(self, m => m.encode_unpadded(sequences))
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
