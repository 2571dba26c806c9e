"""Trains the `demo` model: Wan 2.1's structure (UMT5 text encoder with its Unigram tokenizer, the
causal 3D VAE, the diffusion transformer) at a small size, on the clips of `clips.py`, and exports
a diffusers snapshot folder that Tessera loads like any downloaded Wan 2.1 model.

    python train/train.py --export models/demo

Stages, each saved under --work so that a rerun continues where the last one stopped:
1. tokenizer: a Unigram tokenizer of UMT5's kind whose pieces are the captions' words;
2. text encoder: UMT5, randomly initialised and frozen (the transformer learns to read it);
3. vae: AutoencoderKLWan trained as an autoencoder (L1, and a small penalty on the latent's
   square) on short clips;
4. latents: every training clip encoded once (the posterior mean), and the per-channel mean and
   standard deviation written into the VAE's config, as Wan 2.1's `latents_mean`/`latents_std`;
5. transformer: WanTransformer3DModel trained by flow matching (Wan's velocity target, shifted
   sigmas), with 10 % of captions dropped to the empty prompt for classifier-free guidance;
6. export: model_index.json and one folder per component.

Deterministic for a seed on a given machine and thread count: every random draw comes from a
seeded generator, and torch runs with deterministic algorithms.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

# deterministic cuBLAS, for torch.use_deterministic_algorithms on a GPU (must precede CUDA's start)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clips  # noqa: E402

TEXT_LEN = 512  # the pipeline's max_sequence_length: the transformer always sees 512 text rows
Z_DIM = 16

# Wan's VAE with one stage fewer: 4x in time as Wan, 4x (not 8x) in space. At 8x a 64-pixel clip
# is an 8x8 latent, and this VAE, trained on two cores, kept brightness but lost the shapes' color
# (held-out L1 0.11, 27 % of shape pixels decoded within 60 RGB of their color, after 3,000
# steps); the transformer cannot draw what the VAE does not keep.
VAE_CONFIG = dict(
    base_dim=16,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    dropout=0.0,
    # what pipelines size latents by (diffusers' WanPipeline reads these, and its default, 8, is
    # Wan's); Tessera checks them against dim_mult and temperal_downsample
    scale_factor_spatial=4,
    scale_factor_temporal=4,
)
SPATIAL = 2 ** (len(VAE_CONFIG["dim_mult"]) - 1)  # pixels per latent pixel, each way
assert SPATIAL == VAE_CONFIG["scale_factor_spatial"]
LATENT = clips.SIZE // SPATIAL  # a clip's latent height and width
LATENT_FRAMES = 1 + (clips.FRAMES - 1) // 4
TEXT_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=True,
)
# Patches of 1x4x4 latent pixels: 4x4 tokens per latent frame, 80 per clip. (1x2x2, Wan's, is
# 320 tokens and ~5x the cost per step on a CPU; the shapes move about two of these tokens.)
DIT_CONFIG = dict(
    patch_size=[1, 4, 4],
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
FLOW_SHIFT = 3.0


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(d):
    """A Unigram tokenizer of UMT5's kind (Metaspace pre-tokenizer, `</s>` appended), saved as a
    diffusers `tokenizer/` folder. Its vocabulary is written out, not trained: every caption word
    is one piece (`▁red`), and every character of them a piece of its own, so any prompt
    tokenizes, an unknown word into its letters. Scores are log-frequencies: words before letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in clips.all_prompts() for w in clips.caption(*p).split()})
    letters = sorted({c for w in words for c in w} | {"\u2581"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in words] + [(c, -6.0) for c in letters]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(d)
    return fast


# ------------------------------------------------------------------------------------------ text encoder
def build_text_encoder(d, tok, seed):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = dict(TEXT_CONFIG, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    te = UMT5EncoderModel(UMT5Config(**cfg)).eval()
    te.save_pretrained(d)
    return te


@torch.no_grad()
def encode_text(tok, te, prompts):
    """Each prompt as WanPipeline encodes it: the encoder's output over the real tokens, zero rows
    to TEXT_LEN. Returns [len(prompts), TEXT_LEN, d_model] and each prompt's token count."""
    out = torch.zeros(len(prompts), TEXT_LEN, te.config.d_model)
    lengths = torch.zeros(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids[:, :TEXT_LEN]
        h = te(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out[i, : ids.shape[1]] = h[0]
        lengths[i] = ids.shape[1]
    return out, lengths


class CompactText:
    """The text rows of a batch without the zero rows that pad each prompt to TEXT_LEN.

    WanPipeline pads every prompt's encoding with zero rows to 512. In cross-attention those rows
    are identical (the same key and value), so the 512-row softmax equals one over the real rows
    plus ONE zero row whose logit is raised by log(its multiplicity). Training on that is exact
    and ~50x cheaper in the cross-attention. `rows` [B, K, D] holds each prompt's rows, then a zero
    row, then zero rows masked out; `bias` [B, 1, 1, K] is 0, log(512 − n), then −inf."""

    def __init__(self, table, lengths):
        self.table, self.lengths = table, lengths  # [P, TEXT_LEN, D], [P]
        self.width = int(lengths.max()) + 1

    def batch(self, rows):
        ctx = self.table[rows, : self.width].clone()
        n = self.lengths[rows]
        slot = torch.arange(self.width).view(1, -1)
        bias = torch.where(slot < n.view(-1, 1), 0.0, float("-inf"))
        bias = torch.where(slot == n.view(-1, 1), torch.log((TEXT_LEN - n).float()).view(-1, 1), bias)
        return ctx, bias.view(len(rows), 1, 1, self.width)


def compact_cross_attention(dit, holder):
    """Gives every block's cross-attention the additive bias in `holder["bias"]`."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Biased(WanAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, holder.get("bias"), rotary_emb)

    for block in dit.blocks:
        block.attn2.set_processor(Biased())


@torch.no_grad()
def check_compact_text(dit, holder, text, device):
    """The compact text rows give the transformer's output on the full 512 rows (to float
    rounding), or training stops: what is trained must be what the pipeline runs."""
    rows = torch.arange(text.table.shape[0])[:4]
    x = torch.randn(len(rows), Z_DIM, LATENT_FRAMES, LATENT, LATENT, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100.0, 400.0, 700.0, 999.0])
    holder["bias"] = None
    full = dit(hidden_states=x.to(device), timestep=t.to(device), encoder_hidden_states=text.table[rows].to(device), return_dict=False)[0]
    ctx, bias = text.batch(rows)
    holder["bias"] = bias.to(device)
    compact = dit(hidden_states=x.to(device), timestep=t.to(device), encoder_hidden_states=ctx.to(device), return_dict=False)[0]
    err = ((compact - full).norm() / full.norm()).item()
    assert err < 1e-5, f"compact text rows differ from the full 512: rel_l2 {err}"
    log(f"compact text rows: rel_l2 {err:.1e} against the full 512 rows")


# ------------------------------------------------------------------------------------------ data
def clip_tensor(seed, frames):
    """Clip `seed` as [3, frames, H, W] floats in [-1, 1], and its caption."""
    video, text = clips.clip(seed, frames=frames)
    x = torch.from_numpy(video).float().div(127.5).sub(1.0).permute(3, 0, 1, 2).contiguous()
    return x, text


def shape_mask(x, text, within=60.0):
    """[frames, H, W]: the pixels of `x` (one clip, [3, F, H, W] in [-1, 1]) within `within` RGB of
    the caption's color. Backgrounds stay >= 100 away from every shape color (clips.py), so these
    are the shape's pixels, edges blended over half and more."""
    return ((x + 1) * 127.5 - caption_rgb(text)).norm(dim=0) < within


def caption_rgb(text):
    """The caption's shape color (RGB 0..255), shaped [3, 1, 1, 1] to compare with a clip."""
    return torch.tensor(clips.COLORS[text.split()[1]], dtype=torch.float32).view(3, 1, 1, 1)


def train_seeds(n, base):
    """Training clips use seeds base, base+1, ...; the evaluation's held-out seeds are >= 10**9."""
    return range(base, base + n)


# ------------------------------------------------------------------------------------------ VAE
def pooled(x):
    """The averages over each latent pixel's footprint: frame 0 alone, then groups of 4 frames,
    SPATIAL × SPATIAL pixels."""
    first = torch.nn.functional.avg_pool3d(x[:, :, :1], (1, SPATIAL, SPATIAL))
    if x.shape[2] == 1:
        return first
    return torch.cat([first, torch.nn.functional.avg_pool3d(x[:, :, 1:], (4, SPATIAL, SPATIAL))], 2)


@torch.no_grad()
def vae_report(vae, device, n=8):
    """Held-out 17-frame clips through encode (posterior mean) and decode: the mean L1 (of 2),
    and the share of shape pixels decoded within 60 RGB of their color, which the transformer
    can only be as good as."""
    l1, kept, total = 0.0, 0, 0
    for i in range(n):
        x, text = clip_tensor(10**9 + i, clips.FRAMES)
        y = vae.decode(vae.encode(x[None].to(device)).latent_dist.mode()).sample[0].cpu()
        l1 += (y - x).abs().mean().item() / n
        m = shape_mask(x, text)
        near = ((y + 1) * 127.5 - caption_rgb(text)).norm(dim=0) < 60.0
        kept += int((near & m).sum())
        total += int(m.sum())
    return l1, kept / max(total, 1)


def decode_unclamped(vae, z):
    """`vae.decode` without its final clamp to [-1, 1], which would stop the gradient of every
    pixel decoded past it (diffusers' `AutoencoderKLWan._decode`, untiled: one latent frame at a
    time through the causal caches)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(out, 2)


# The VAE's two phases. The first learns to reconstruct at all: windows of 1 + 4k frames (single
# frames are the first chunk's path; longer windows the causal cache across chunks), half on
# 32-pixel crops, the probe on. The second is about what the prompt names, the shape's color over
# the whole clip: after the first, held-out shapes kept their color in frame 0 but lost it over
# the later chunks (RGB distance 17 in frame 0, ~100 by frame 16), and blue and green shapes
# everywhere, so it trains on longer windows of whole frames with the shape weighted 10x.
VAE_PHASES = (
    dict(name="vae", frames=[1, 5, 9, 17], crops=[32, clips.SIZE], shape_weight=4.0, probe=True),
    dict(name="vae-tune", frames=[5, 9, 17, 17], crops=[32, clips.SIZE, clips.SIZE], shape_weight=10.0, probe=False),
)


def train_vae(args, device, vae=None):
    """The VAE through both phases, or only the second when `vae` (a trained first phase) is
    given."""
    from diffusers import AutoencoderKLWan

    if vae is None:
        torch.manual_seed(args.seed)
        vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM).to(device)
        vae_phase(vae, args, device, VAE_PHASES[0], args.vae_steps, args.vae_lr, seed=args.seed + 1)
    vae_phase(vae, args, device, VAE_PHASES[1], args.vae_tune_steps, args.vae_tune_lr, seed=args.seed + 4)
    return vae.eval()


def vae_phase(vae, args, device, phase, steps, peak_lr, seed):
    """`steps` steps of `phase` (VAE_PHASES) at a warmed-up, cosine-decayed `peak_lr`."""
    vae.train()
    # A training aid, dropped afterwards: a 1×1 probe reading the averages over each latent
    # pixel's footprint off the latent. Without it the encoder collapses to one latent for every
    # clip while the decoder learns the mean clip (seen at this size: every clip encoded alike
    # within 2e-4). Once the encoder is past that, the second phase goes without.
    probe = torch.nn.Conv3d(Z_DIM, 3, 1).to(device)
    params = list(vae.parameters()) + (list(probe.parameters()) if phase["probe"] else [])
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    gen = np.random.Generator(np.random.PCG64(seed))
    t0 = time.time()
    name = phase["name"]
    for step in range(steps):
        lr = peak_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        seeds = gen.integers(0, 10**8, size=args.vae_batch)
        # windows of consecutive frames (1 + 4k of the 17), on crops or whole frames (the VAE is
        # convolutional but for its mid-block attention)
        frames = int(gen.choice(phase["frames"]))
        crop = int(gen.choice(phase["crops"]))
        xs, ws = [], []
        for s in seeds:
            y0, x0 = (int(v) for v in gen.integers(0, clips.SIZE - crop + 1, size=2))
            f0 = int(gen.integers(0, clips.FRAMES - frames + 1))
            full, text = clip_tensor(int(s), clips.FRAMES)
            window = (slice(f0, f0 + frames), slice(y0, y0 + crop), slice(x0, x0 + crop))
            xs.append(full[(slice(None),) + window])
            # the shape is a few percent of the pixels but all the prompt is about: weighted
            ws.append(1.0 + (phase["shape_weight"] - 1.0) * shape_mask(full, text)[window].float())
        x = torch.stack(xs).to(device)
        w = torch.stack(ws)[:, None].to(device)
        # an autoencoder: the decoder reads the posterior mean, which is what the pipeline's
        # encodes and the transformer's training latents are; a small penalty on its square keeps
        # the latent's scale in bounds (the scale itself is normalised away by latents_std)
        z = vae.encode(x).latent_dist.mode()
        y = decode_unclamped(vae, z)
        # L1 for sharp edges, plus MSE, which weighs a whole wrong-colored shape more than L1 does
        rec = (w * (y - x).abs()).mean() / w.mean()
        mse = (w * (y - x).pow(2)).mean() / w.mean()
        z2 = z.pow(2).mean()
        loss = rec + mse + args.vae_z2 * z2
        aux = torch.zeros(())
        if phase["probe"]:
            aux = (probe(z) - pooled(x)).pow(2).mean()
            loss = loss + (1.0 - 0.9 * step / steps) * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} l1 {rec.item():.4f} probe {aux.item():.4f} z² {z2.item():.3f} lr {lr:.2e} ({time.time() - t0:.0f} s)")
        if (step + 1) % 250 == 0 or step == steps - 1:
            vae.eval()
            l1, kept = vae_report(vae, device)
            vae.train()
            log(f"{name} held-out 17-frame clips after {step + 1} steps: l1 {l1:.4f} (of 2), shape pixels kept {100 * kept:.1f} %")


@torch.no_grad()
def encode_clips(vae, seeds, device, batch=8):
    """The posterior means of the 17-frame clips of `seeds`: [N, Z, LATENT_FRAMES, LATENT, LATENT],
    and their captions."""
    zs, texts = [], []
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        xs = [clip_tensor(s, clips.FRAMES) for s in seeds[i : i + batch]]
        x = torch.stack([v for v, _ in xs]).to(device)
        zs.append(vae.encode(x).latent_dist.mode().cpu())
        texts += [t for _, t in xs]
    return torch.cat(zs), texts


# ------------------------------------------------------------------------------------------ transformer
def shifted_sigma(u, shift):
    return shift * u / (1 + (shift - 1) * u)


def train_dit(args, latents, text_index, text, device):
    """Flow matching: x_t = (1 − σ) x0 + σ ε, target ε − x0, timestep 1000 σ."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed + 2)
    dit = WanTransformer3DModel(**DIT_CONFIG)
    if args.dit_init:
        # a warm start: another run's transformer (e.g. train/checkpoints/demo/transformer)
        from safetensors.torch import load_file

        dit.load_state_dict(load_file(os.path.join(args.dit_init, "diffusion_pytorch_model.safetensors")))
    dit = dit.to(device)
    holder = {}
    compact_cross_attention(dit, holder)
    check_compact_text(dit, holder, text, device)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.dit_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in dit.parameters()]
    gen = torch.Generator().manual_seed(args.seed + 3)
    n = latents.shape[0]
    empty = text.table.shape[0] - 1  # the last row is the empty prompt
    t0 = time.time()
    for step in range(args.dit_steps):
        lr = args.dit_lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.dit_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.dit_batch,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(args.dit_batch, generator=gen) < args.caption_dropout
        rows = torch.where(drop, torch.full_like(idx, empty), text_index[idx])
        ctx, bias = text.batch(rows)
        holder["bias"] = bias.to(device)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigma(torch.rand(args.dit_batch, generator=gen), FLOW_SHIFT)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = dit(hidden_states=xt.to(device), timestep=(sigma * 1000).to(device), encoder_hidden_states=ctx.to(device), return_dict=False)[0]
        loss = (pred.float() - (noise - x0).to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, dit.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == args.dit_steps - 1:
            log(f"dit step {step}/{args.dit_steps} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t0:.0f} s)")
    with torch.no_grad():
        for e, p in zip(ema, dit.parameters()):
            p.copy_(e)
    holder.clear()
    return dit.eval()


# ------------------------------------------------------------------------------------------ export
def export(dst, work):
    """The snapshot folder: model_index.json naming each component, and the components."""
    from diffusers import UniPCMultistepScheduler

    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for c in ("tokenizer", "text_encoder", "vae", "transformer"):
        shutil.copytree(os.path.join(work, c), os.path.join(dst, c))
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    sch.save_pretrained(os.path.join(dst, "scheduler"))
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    # the trainer's own record rides along: steps, losses, seconds
    shutil.copy(os.path.join(work, "training.json"), os.path.join(dst, "training.json"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    log(f"exported {dst}: {size / 2**20:.1f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="train/work", help="where stages are saved (a rerun reuses finished stages)")
    p.add_argument("--export", default="models/demo", help="the snapshot folder to write")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=8)
    # 1e-3 and 3e-3 collapse this VAE to the mean clip; 1e-4 learns
    p.add_argument("--vae-lr", type=float, default=1.5e-4)
    p.add_argument("--vae-z2", type=float, default=1e-4, help="weight of the latent's mean square")
    p.add_argument("--vae-tune-steps", type=int, default=1000, help="steps of the VAE's second phase (whole clips, the shape weighted)")
    p.add_argument("--vae-tune-lr", type=float, default=1e-4)
    p.add_argument(
        "--vae-tune-only", action="store_true", help="with --redo vae: run only the second phase, on the VAE saved under --work (its first phase)"
    )
    p.add_argument("--clips", type=int, default=2000, help="training clips for the transformer")
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--dit-init", default="", help="a transformer folder to start from (a warm start) instead of random weights")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--redo", default="", help="comma-separated stages to run again (vae, latents, transformer)")
    args = p.parse_args()

    torch.use_deterministic_algorithms(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    redo = set(filter(None, args.redo.split(",")))
    os.makedirs(args.work, exist_ok=True)
    record_path = os.path.join(args.work, "training.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    record.update(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, seed=args.seed)
    log(f"device {device}, {torch.get_num_threads()} threads")

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok_dir, te_dir, vae_dir, dit_dir = (os.path.join(args.work, c) for c in ("tokenizer", "text_encoder", "vae", "transformer"))
    if not os.path.isdir(tok_dir):
        build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if not os.path.isdir(te_dir):
        build_text_encoder(te_dir, tok, args.seed)
    te = UMT5EncoderModel.from_pretrained(te_dir).eval()

    t = time.time()
    if not os.path.isdir(vae_dir) or "vae" in redo:
        first = None
        if args.vae_tune_only:
            first = AutoencoderKLWan.from_pretrained(vae_dir).to(device)
            shutil.copytree(vae_dir, vae_dir + "-phase1", dirs_exist_ok=True)
        vae = train_vae(args, device, first)
        vae.save_pretrained(vae_dir)
        phases = dict(tune_steps=args.vae_tune_steps, tune_seconds=round(time.time() - t))
        if first is None:
            record["vae"] = dict(steps=args.vae_steps, batch=args.vae_batch, seconds=round(time.time() - t), **phases)
        else:
            record.setdefault("vae", {}).update(phases)
        redo.add("latents")
    vae = AutoencoderKLWan.from_pretrained(vae_dir).to(device).eval()

    lat_path = os.path.join(args.work, "latents.pt")
    if not os.path.exists(lat_path) or "latents" in redo:
        t = time.time()
        z, texts = encode_clips(vae, train_seeds(args.clips, 10**8), device)
        mean = z.transpose(0, 1).reshape(Z_DIM, -1).mean(1)
        std = z.transpose(0, 1).reshape(Z_DIM, -1).std(1)
        torch.save(dict(z=z, texts=texts), lat_path)
        cfg = json.load(open(os.path.join(vae_dir, "config.json")))
        cfg.update(latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std])
        json.dump(cfg, open(os.path.join(vae_dir, "config.json"), "w"), indent=2)
        record["latents"] = dict(clips=args.clips, seconds=round(time.time() - t))
        redo.add("transformer")
    saved = torch.load(lat_path)
    cfg = json.load(open(os.path.join(vae_dir, "config.json")))
    mean = torch.tensor(cfg["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, -1, 1, 1, 1)
    latents = (saved["z"] - mean) / std  # what the pipeline's noise becomes, and back at decode

    prompts = sorted(set(saved["texts"])) + [""]
    table, lengths = encode_text(tok, te, prompts)
    text = CompactText(table, lengths)
    index = torch.tensor([prompts.index(t) for t in saved["texts"]])

    if not os.path.isdir(dit_dir) or "transformer" in redo:
        t = time.time()
        dit = train_dit(args, latents, index, text, device)
        dit.save_pretrained(dit_dir)
        record["transformer"] = dict(steps=args.dit_steps, batch=args.dit_batch, seconds=round(time.time() - t))
    json.dump(record, open(record_path, "w"), indent=2)
    export(args.export, args.work)


if __name__ == "__main__":
    main()
