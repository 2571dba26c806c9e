//! The Wan 2.1 transformer (diffusers `WanTransformer3DModel`), written once over the backend
//! seam [`Ops`]: parameters uploaded from a [`WeightSource`], `forward` returning the f32 velocity
//! on the host, `forward_tokens` for one shard's token range and `forward_patches` for a rank's
//! patch rows kept on the device, behind [`SelfAttention`] (the sequence-parallel seam). The same
//! code runs in f32 on the CPU, in bf16 on a GPU, and in bf16 under the host twin of the GPU path.
//! SkyReels-V2 (diffusion forcing) is this model with options: one timestep per latent frame
//! (each frame's tokens modulated by its own vectors), the fps embedding, and the causal block
//! mask ([`ForwardOptions`]).

use super::attention::{LocalAttention, SelfAttention, Visibility};
use super::block::{Block, Dims, Modulation, Workspace};
use super::embedding::{Conditions, Embedders};
use super::weights::{load_f32, DeviceLinear};
use crate::model::patch::PatchGrid;
use crate::transformer_config::{TransformerConfig, TransformerPreset};
use crate::weights::{RandomWeights, WeightSource, WeightStore};
use crate::{Result, WorkerError};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tessera_kernels::backend::{at, at_mut, CpuOps, CudaOps, HostOps, Ops};
use tessera_kernels::cpu::{Activation, PatchGeometry, Rope3d};
use tessera_kernels::Tensor;

/// What a forward does beyond Wan 2.1's defaults (SkyReels-V2 diffusion forcing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// The fps index of a model with `inject_sample_info` (0: 16 fps, 1: any other rate);
    /// required by such a model, ignored by the others.
    pub fps_index: Option<usize>,
    /// Latent frames per block of the causal block mask; `None` takes the model's
    /// `num_frame_per_block` (1: no mask). Must divide the frames.
    pub causal_block: Option<usize>,
}

/// Inputs of a forward pass, as diffusers names them.
#[derive(Clone, Copy)]
pub struct DitInputs<'a> {
    /// Noisy latents `[B, C_in, F, H, W]`.
    pub hidden_states: &'a Tensor,
    /// The scheduler's integer timesteps, as f32: one per sample `[B]`, or one per latent frame
    /// of each sample `[B, F]` row-major (diffusion forcing).
    pub timesteps: &'a [f32],
    /// Text encoder states `[B, L, text_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Image encoder tokens `[B, L_img, image_dim]` (image-to-video only).
    pub encoder_hidden_states_image: Option<&'a Tensor>,
    /// Diffusion-forcing options.
    pub options: ForwardOptions,
}

/// Inputs of a forward pass over one rank's tokens already cut into patch rows: the form in which
/// a sequence-parallel run keeps its latent between steps (each rank holds only its rows, on its
/// device). Every sample of the batch shares the same rows (the conditional and unconditional
/// passes of guidance see the same latent).
pub struct PatchInputs<'a, O: Ops> {
    /// The patch rows of `tokens`: `[tokens.len(), C_in·p_t·p_h·p_w]`, f32, on the device.
    pub patches: &'a O::Buf<f32>,
    /// The latent's patch grid.
    pub grid: PatchGrid,
    /// The global indices of the rows' tokens in the flattened (frame, row, column) grid.
    pub tokens: Range<usize>,
    /// One timestep per sample `[B]`, or per latent frame of each sample `[B, F]`.
    pub timesteps: &'a [f32],
    /// Text encoder states `[B, L, text_dim]` (B is the batch).
    pub encoder_hidden_states: &'a Tensor,
    /// Image encoder tokens `[B, L_img, image_dim]` (image-to-video only).
    pub encoder_hidden_states_image: Option<&'a Tensor>,
    /// Diffusion-forcing options.
    pub options: ForwardOptions,
}

/// Where the patch rows of a forward come from.
enum TokenSource<'a, O: Ops> {
    /// One sample of a host latent `[C_in, F, H, W]`: uploaded, then the tokens' patches cut.
    Latent(&'a [f32]),
    /// Patch rows already on the device.
    Patches(&'a O::Buf<f32>),
}

/// The transformer in f32 on the CPU (the reference).
pub type CpuWanTransformer = WanTransformer<CpuOps>;

/// The transformer in bf16 on a CUDA GPU.
pub type CudaWanTransformer = WanTransformer<CudaOps>;

/// The same bf16 computation emulated on the host (tests; the yardstick of the CUDA forward).
pub type EmulatedWanTransformer = WanTransformer<HostOps>;

/// Which RoPE rows a cached table holds: (grid, token range).
type RopeKey = ([usize; 3], Range<usize>);

/// A Wan 2.1 transformer whose parameters live on the backend `O`'s device, stored as `O::Act`
/// (bf16 as diffusers runs it in bf16, or f32).
pub struct WanTransformer<O: Ops> {
    ops: O,
    cfg: TransformerConfig,
    dims: Dims,
    embedders: Embedders<O>,
    patch_embedding: DeviceLinear<O>,
    blocks: Vec<Block<O>>,
    head_table: O::Buf<f32>,
    proj_out: DeviceLinear<O>,
    rope: Rope3d,
    rope_cache: Mutex<Option<(RopeKey, Arc<O::Rope>)>>,
}

impl CudaWanTransformer {
    /// Loads a diffusers `transformer/` folder onto CUDA device `ordinal`.
    pub fn load_on(dir: &Path, ordinal: usize) -> Result<Self> {
        Self::load(CudaOps::open(ordinal)?, dir)
    }
}

impl<O: Ops> WanTransformer<O> {
    /// Loads a diffusers `transformer/` folder (`config.json` and safetensors weights).
    pub fn load(ops: O, dir: &Path) -> Result<Self> {
        let (cfg, store) = open_transformer_dir(dir)?;
        Self::from_source(ops, cfg, &store)
    }

    /// A built-in configuration with deterministic random weights (same seed, same parameters on
    /// every backend).
    pub fn preset(ops: O, preset: TransformerPreset, seed: u64) -> Result<Self> {
        Self::from_source(ops, preset.config(), &RandomWeights::new(seed))
    }

    /// Builds the model from any weight source, uploading each parameter as it is read; every
    /// parameter is checked by name and shape, and unused tensors are an error, as on the CPU.
    pub fn from_source(ops: O, cfg: TransformerConfig, src: &dyn WeightSource) -> Result<Self> {
        cfg.validate().map_err(|detail| WorkerError::Config { path: "transformer config".into(), detail })?;
        let hd = cfg.attention_head_dim;
        if ops.attention_width(hd).is_none() {
            let detail = format!("attention_head_dim {hd}: {} takes even head dims up to 128", ops.describe());
            return Err(WorkerError::Config { path: "transformer config".into(), detail });
        }
        let d = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let pe_w = src.tensor("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw])?;
        let pe_b = src.tensor("patch_embedding.bias", &[d])?;
        let model = Self {
            patch_embedding: DeviceLinear::from_host(&ops, &pe_w, Some(&pe_b), cfg.patch_in(), d)?,
            embedders: Embedders::load(&ops, src, &cfg)?,
            blocks: (0..cfg.num_layers).map(|i| Block::load(&ops, src, &cfg, i)).collect::<Result<_>>()?,
            head_table: load_f32(&ops, src, "scale_shift_table", &[1, 2, d])?,
            proj_out: head_projection(&ops, src, &cfg)?,
            rope: Rope3d::wan(hd, cfg.rope_max_seq_len, 10000.0)?,
            rope_cache: Mutex::new(None),
            dims: Dims::of(&cfg),
            cfg,
            ops,
        };
        src.finish()?;
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// The device operations (for their description).
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Checks the inputs against the model and returns (batch, patch grid).
    pub fn check_inputs(&self, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
        check_dit_inputs(&self.cfg, x)
    }

    /// Time, text and image embeddings and every block's modulation, for the whole batch
    /// (replicated on every shard).
    pub fn embed_conditions(&self, x: &DitInputs<'_>) -> Result<Conditions<O>> {
        self.embed(x.timesteps, x.encoder_hidden_states, x.encoder_hidden_states_image, x.options)
    }

    /// [`embed_conditions`](Self::embed_conditions) from the timesteps (`[B]` or `[B, F]`), text
    /// and image states (B = the text's batch).
    fn embed(&self, timesteps: &[f32], encoder_hidden_states: &Tensor, image_states: Option<&Tensor>, options: ForwardOptions) -> Result<Conditions<O>> {
        let (ops, d, e) = (&self.ops, self.dims.d, &self.embedders);
        let b = encoder_hidden_states.dim(0);
        if b == 0 || !timesteps.len().is_multiple_of(b) {
            return Err(WorkerError::input("timestep", format!("{} values for a batch of {b}", timesteps.len())));
        }
        // One modulation row per distinct timestep (guidance's two passes, a block of frames).
        let mut distinct: Vec<f32> = Vec::new();
        let row_of = timesteps
            .iter()
            .map(|t| match distinct.iter().position(|u| u.to_bits() == t.to_bits()) {
                Some(i) => i,
                None => {
                    distinct.push(*t);
                    distinct.len() - 1
                }
            })
            .collect();
        let rows = distinct.len();
        let (mut tproj, temb) = e.time(ops, &distinct)?;
        // SkyReels-V2: the fps term joins every row of timestep_proj (not the head's embedding).
        if let Some(fps) = &e.fps {
            let index = options.fps_index.ok_or_else(|| WorkerError::input("fps", "required by a model with inject_sample_info"))?;
            let term = fps.term(index)?;
            let all: Vec<f32> = (0..rows).flat_map(|_| term.iter().copied()).collect();
            ops.add(at_mut(&mut tproj, 0), at(&ops.upload(&all)?, 0), None, rows * 6 * d, 6 * d)?;
        }
        // Blocks: scale_shift_table + timestep_proj in f32 (0 + a + b is exactly a + b), per row.
        let per_row = self.blocks.len() * 6 * d;
        let mut block_mods = ops.zeros::<f32>(rows * per_row)?;
        for r in 0..rows {
            for (l, block) in self.blocks.iter().enumerate() {
                let off = r * per_row + l * 6 * d;
                ops.add(at_mut(&mut block_mods, off), at(&tproj, r * 6 * d), None, 6 * d, 6 * d)?;
                ops.add(at_mut(&mut block_mods, off), at(&block.table, 0), None, 6 * d, 6 * d)?;
            }
        }
        // Head: its table + the bf16 time embedding, for shift and for scale.
        let doubled: Vec<f32> = temb.chunks_exact(d).flat_map(|t| t.iter().chain(t).copied()).collect();
        let mut head_mods = ops.upload(&doubled)?;
        for r in 0..rows {
            ops.add(at_mut(&mut head_mods, r * 2 * d), at(&self.head_table, 0), None, 2 * d, 2 * d)?;
        }
        let text_len = encoder_hidden_states.dim(1);
        let per_text = text_len * self.cfg.text_dim;
        let text_data = encoder_hidden_states.data();
        let text = (0..b).map(|i| e.text(ops, &text_data[i * per_text..(i + 1) * per_text], text_len)).collect::<Result<Vec<_>>>()?;
        let image = match (&e.image, image_states) {
            (Some(emb), Some(img)) => {
                let (n, width) = (img.dim(1), img.dim(2));
                let ctx = (0..b).map(|i| Ok(ops.upload(&emb.forward(&img.data()[i * n * width..(i + 1) * n * width], n)?)?)).collect::<Result<Vec<_>>>()?;
                Some((ctx, n))
            }
            (None, None) => None,
            (None, Some(_)) => return Err(WorkerError::input("encoder_hidden_states_image", "given to a text-to-video model")),
            (Some(_), None) => return Err(WorkerError::input("encoder_hidden_states_image", "required by an image-to-video model")),
        };
        Ok(Conditions { rows_per_sample: timesteps.len() / b, row_of, block_mods, head_mods, text, text_len, image })
    }

    /// The RoPE rows of `tokens` of `grid`, on the device (the last table is kept for the next call).
    fn rope_for(&self, grid: &PatchGrid, tokens: Range<usize>) -> Result<Arc<O::Rope>> {
        let key = (grid.dims, tokens.clone());
        let mut cache = self.rope_cache.lock().map_err(|_| WorkerError::input("rope", "cache lock poisoned"))?;
        if let Some((k, t)) = cache.as_ref() {
            if *k == key {
                return Ok(t.clone());
            }
        }
        let table = Arc::new(self.ops.upload_rope(&self.rope.table(grid.dims, tokens)?)?);
        *cache = Some((key, table.clone()));
        Ok(table)
    }

    /// Runs tokens `tokens` (global indices into the flattened (frame, row, column) grid) of
    /// sample `b` through the model, with `attn` joining them to the rest of the sequence.
    /// Returns the head's output rows `[tokens.len(), C_out·p_t·p_h·p_w]` (f32 holding `Act`
    /// values, features in the patch rows' order) on the device.
    pub fn forward_tokens(
        &self,
        x: &DitInputs<'_>,
        cond: &Conditions<O>,
        b: usize,
        grid: &PatchGrid,
        tokens: Range<usize>,
        attn: &dyn SelfAttention<O>,
    ) -> Result<O::Buf<f32>> {
        let per_sample = self.cfg.in_channels * grid.latent().iter().product::<usize>();
        let sample =
            x.hidden_states.data().get(b * per_sample..(b + 1) * per_sample).ok_or_else(|| WorkerError::input("hidden_states", format!("no sample {b}")))?;
        let visibility = self.visibility(grid, x.options)?;
        self.run_tokens(TokenSource::Latent(sample), cond, b, grid, tokens, visibility, attn)
    }

    /// The head's output rows `[tokens.len(), C_out·p_t·p_h·p_w]` (f32 holding `Act` values, on the
    /// device, in the patch rows' feature order) of every sample of `x`'s batch, from the rank's patch rows; `attn` joins them to
    /// the rest of the sequence. Nothing is gathered: the rows stay where the rank keeps its
    /// share of the latent.
    pub fn forward_patches(&self, x: &PatchInputs<'_, O>, attn: &dyn SelfAttention<O>) -> Result<Vec<O::Buf<f32>>> {
        let b = x.encoder_hidden_states.dim(0);
        check_conditions(&self.cfg, b, &x.grid, x.timesteps, x.encoder_hidden_states, x.encoder_hidden_states_image, x.options)?;
        let want = x.tokens.len() * self.cfg.patch_in();
        if x.tokens.start > x.tokens.end || x.tokens.end > x.grid.tokens() || self.ops.len(x.patches) != want {
            return Err(WorkerError::input(
                "patches",
                format!("{} values for tokens {:?} of a grid of {} ({want} expected)", self.ops.len(x.patches), x.tokens, x.grid.tokens()),
            ));
        }
        let cond = self.embed(x.timesteps, x.encoder_hidden_states, x.encoder_hidden_states_image, x.options)?;
        let visibility = self.visibility(&x.grid, x.options)?;
        (0..b).map(|i| self.run_tokens(TokenSource::Patches(x.patches), &cond, i, &x.grid, x.tokens.clone(), visibility, attn)).collect()
    }

    /// Which keys each token sees under `options`: a causal block mask of whole frames, or all.
    pub fn visibility(&self, grid: &PatchGrid, options: ForwardOptions) -> Result<Visibility> {
        let [frames, h, w] = grid.dims;
        let c = options.causal_block.unwrap_or(self.cfg.num_frame_per_block);
        if c == 0 || !frames.is_multiple_of(c) {
            return Err(WorkerError::input("causal_block_size", format!("{c} frames per block does not divide the {frames} latent frames")));
        }
        Ok(if c == 1 { Visibility::Full } else { Visibility::BlockCausal { block: c * h * w } })
    }

    /// The body of [`forward_tokens`](Self::forward_tokens) and
    /// [`forward_patches`](Self::forward_patches): patch rows in, head rows out.
    #[allow(clippy::too_many_arguments)]
    fn run_tokens(
        &self,
        source: TokenSource<'_, O>,
        cond: &Conditions<O>,
        b: usize,
        grid: &PatchGrid,
        tokens: Range<usize>,
        visibility: Visibility,
        attn: &dyn SelfAttention<O>,
    ) -> Result<O::Buf<f32>> {
        let (ops, c, dims) = (&self.ops, &self.cfg, &self.dims);
        let (d, n) = (dims.d, tokens.len());
        if tokens.start > tokens.end || tokens.end > grid.tokens() || cond.text.len() <= b {
            return Err(WorkerError::input(
                "tokens",
                format!("tokens {tokens:?} of sample {b}: the grid has {} tokens, the batch {} samples", grid.tokens(), cond.text.len()),
            ));
        }
        let context = cond.text_len.max(cond.image.as_ref().map_or(0, |(_, n)| *n));
        let wide = c.patch_in().max(c.patch_out());
        let mut ws = Workspace::new(ops, dims, n, context, wide, cond.image.is_some())?;

        // Patch embedding (Conv3d as a matrix product on the patches) into the residual stream.
        match source {
            TokenSource::Latent(sample) => {
                let geometry = PatchGeometry { channels: c.in_channels, grid: grid.dims, patch: grid.patch };
                ops.patchify(&ops.upload(sample)?, &geometry, tokens.clone(), &mut ws.wide)?;
            }
            // The same rounding to `Act` as patchify's.
            TokenSource::Patches(rows) => ops.narrow(at(rows, 0), at_mut(&mut ws.wide, 0), n * c.patch_in())?,
        }
        self.patch_embedding.forward(ops, at(&ws.wide, 0), n, Activation::None, at_mut(&mut ws.h, 0))?;
        ops.widen(at(&ws.h, 0), at_mut(&mut ws.x, 0), n * d)?;

        // Runs of rows sharing a modulation row: all of them, or runs of frames.
        let m = cond.rows_per_sample;
        let sample_rows = cond.row_of.get(b * m..(b + 1) * m).ok_or_else(|| WorkerError::input("timestep", format!("no timesteps for sample {b}")))?;
        let runs = mod_runs(&tokens, grid, sample_rows)?;
        let rope = self.rope_for(grid, tokens)?;
        let image = cond.image.as_ref().map(|(ctx, len)| (&ctx[b], *len));
        let per_row = self.blocks.len() * 6 * d;
        for (l, block) in self.blocks.iter().enumerate() {
            let mods = Modulation { buf: &cond.block_mods, runs: &runs, pitch: per_row, offset: l * 6 * d };
            block.forward(ops, dims, &mut ws, &mods, (&cond.text[b], cond.text_len), image, &rope, visibility, attn)?;
        }

        // Output head: LayerNorm without affine, modulated by the raw time embedding ([shift |
        // scale] per row); `Act` out.
        Modulation { buf: &cond.head_mods, runs: &runs, pitch: 2 * d, offset: 0 }.norm(ops, dims, &mut ws, 1, 0)?;
        let po = c.patch_out();
        self.proj_out.forward(ops, at(&ws.h, 0), n, Activation::None, at_mut(&mut ws.wide, 0))?;
        let mut rows = ops.zeros::<f32>(n * po)?;
        ops.widen(at(&ws.wide, 0), at_mut(&mut rows, 0), n * po)?;
        Ok(rows)
    }

    /// The velocity `[B, C_out, F, H, W]` for `x`, all tokens on this device; f32 on the host
    /// (in bf16: diffusers' bf16 output, widened).
    pub fn forward(&self, x: &DitInputs<'_>) -> Result<Tensor> {
        self.forward_with(x, &LocalAttention)
    }

    /// As [`forward`](Self::forward), with a chosen self-attention over the full sequence.
    pub fn forward_with(&self, x: &DitInputs<'_>, attn: &dyn SelfAttention<O>) -> Result<Tensor> {
        let (b, grid) = self.check_inputs(x)?;
        let cond = self.embed_conditions(x)?;
        let c = &self.cfg;
        let geometry = PatchGeometry { channels: c.out_channels, grid: grid.dims, patch: grid.patch };
        let mut latent = self.ops.zeros::<f32>(geometry.latent_len())?;
        let mut out = Vec::with_capacity(b * geometry.latent_len());
        for i in 0..b {
            let rows = self.forward_tokens(x, &cond, i, &grid, 0..grid.tokens(), attn)?;
            self.ops.unpatchify(&rows, &geometry, &mut latent)?;
            out.extend(self.ops.download(&latent)?);
        }
        let [f, h, w] = grid.latent();
        Ok(Tensor::new([b, c.out_channels, f, h, w], out)?)
    }
}

/// The rows of `tokens` (as local row ranges) cut where their modulation row changes, with that
/// row. `rows` holds the sample's modulation row per timestep: one (every token uses it), or one
/// per frame of the grid (frame f's tokens use `rows[f]`; neighbouring frames with the same row
/// are one run).
fn mod_runs(tokens: &Range<usize>, grid: &PatchGrid, rows: &[usize]) -> Result<Vec<(Range<usize>, usize)>> {
    let [frames, h, w] = grid.dims;
    if let [row] = rows {
        return Ok(vec![(0..tokens.len(), *row)]);
    }
    if rows.len() != frames {
        return Err(WorkerError::input("timestep", format!("{} timesteps per sample for {frames} latent frames", rows.len())));
    }
    let per_frame = h * w;
    let mut runs: Vec<(Range<usize>, usize)> = Vec::new();
    let first = tokens.start / per_frame;
    for (f, &frame_row) in rows.iter().enumerate().take(tokens.end.div_ceil(per_frame)).skip(first) {
        let (s, e) = ((f * per_frame).max(tokens.start) - tokens.start, ((f + 1) * per_frame).min(tokens.end) - tokens.start);
        match runs.last_mut() {
            Some((run, row)) if *row == frame_row => run.end = e,
            _ if s < e => runs.push((s..e, frame_row)),
            _ => {}
        }
    }
    Ok(runs)
}

/// The output projection `proj_out` with its rows reordered from diffusers' (p_t, p_h, p_w, c) to
/// (c, p_t, p_h, p_w), the patch embedding's order: a token's head row then lines up with its
/// patch row element by element (the sampler steps a rank's latent rows with them), and
/// `unpatchify` is `patchify`'s inverse. Each output is the same dot product as before: only its
/// place in the row moves.
fn head_projection<O: Ops>(ops: &O, src: &dyn WeightSource, cfg: &TransformerConfig) -> Result<DeviceLinear<O>> {
    let (d, po, c) = (cfg.inner_dim(), cfg.patch_out(), cfg.out_channels);
    let weight = src.tensor("proj_out.weight", &[po, d])?;
    let bias = src.tensor("proj_out.bias", &[po])?;
    let per = po / c;
    let (mut w, mut b) = (vec![0.0f32; weight.len()], vec![0.0f32; po]);
    for ch in 0..c {
        for q in 0..per {
            let (new, old) = (ch * per + q, q * c + ch);
            w[new * d..(new + 1) * d].copy_from_slice(&weight[old * d..(old + 1) * d]);
            b[new] = bias[old];
        }
    }
    DeviceLinear::from_host(ops, &w, Some(&b), d, po)
}

/// A diffusers `transformer/` folder: its `config.json` and its weights (single or sharded).
pub(crate) fn open_transformer_dir(dir: &Path) -> Result<(TransformerConfig, WeightStore)> {
    let cfg = crate::transformer_config::read_config(&dir.join("config.json"))?;
    // Early diffusers versions wrote an unused `norm_added_q` for image-to-video models.
    let store = WeightStore::open_dir(dir)?.ignore_unused(&["attn2.norm_added_q.weight"]);
    Ok((cfg, store))
}

/// Checks forward inputs against a transformer configuration; returns (batch, patch grid).
pub(crate) fn check_dit_inputs(c: &TransformerConfig, x: &DitInputs<'_>) -> Result<(usize, PatchGrid)> {
    let hs = x.hidden_states.shape();
    if hs.len() != 5 || hs[1] != c.in_channels || hs[0] == 0 {
        return Err(WorkerError::input("hidden_states", format!("expected [B, {}, F, H, W], got {hs:?}", c.in_channels)));
    }
    let b = hs[0];
    let grid = PatchGrid::new([hs[2], hs[3], hs[4]], c.patch_size)?;
    check_conditions(c, b, &grid, x.timesteps, x.encoder_hidden_states, x.encoder_hidden_states_image, x.options)?;
    Ok((b, grid))
}

/// Checks the conditioning inputs of a batch of `b` on `grid` against a transformer
/// configuration.
fn check_conditions(
    c: &TransformerConfig,
    b: usize,
    grid: &PatchGrid,
    timesteps: &[f32],
    encoder_hidden_states: &Tensor,
    image_states: Option<&Tensor>,
    options: ForwardOptions,
) -> Result<()> {
    let frames = grid.dims[0];
    let per_frame = timesteps.len() == b * frames && c.patch_size[0] == 1;
    if b == 0 || (timesteps.len() != b && !per_frame) {
        return Err(WorkerError::input(
            "timestep",
            format!("{} values for a batch of {b} ({b} or, with temporal patch 1, {b}×{frames} per frame expected)", timesteps.len()),
        ));
    }
    if c.inject_sample_info && !matches!(options.fps_index, Some(0 | 1)) {
        return Err(WorkerError::input("fps", format!("{:?}: a model with inject_sample_info takes fps index 0 (16 fps) or 1", options.fps_index)));
    }
    if let Some(t) = timesteps.iter().find(|t| !t.is_finite()) {
        return Err(WorkerError::input("timestep", format!("{t} is not finite")));
    }
    let es = encoder_hidden_states.shape();
    if es.len() != 3 || es[0] != b || es[2] != c.text_dim || es[1] == 0 {
        return Err(WorkerError::input("encoder_hidden_states", format!("expected [{b}, L, {}], got {es:?}", c.text_dim)));
    }
    match (c.image_dim, image_states) {
        (Some(dim), Some(img)) => {
            let is = img.shape();
            if is.len() != 3 || is[0] != b || is[2] != dim || is[1] == 0 {
                return Err(WorkerError::input("encoder_hidden_states_image", format!("expected [{b}, L_img, {dim}], got {is:?}")));
            }
        }
        (Some(_), None) => return Err(WorkerError::input("encoder_hidden_states_image", "required by an image-to-video model")),
        (None, Some(_)) => return Err(WorkerError::input("encoder_hidden_states_image", "given to a text-to-video model")),
        (None, None) => {}
    }
    Ok(())
}
