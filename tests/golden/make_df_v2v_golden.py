"""Golden case pipeline/df-v2v-a: diffusers' SkyReelsV2DiffusionForcingVideoToVideoPipeline (video
extension by diffusion forcing) on the components of pipeline/df-a, float32 on CPU.

usage: python make_df_v2v_golden.py [GOLDEN_ROOT]     (GOLDEN_ROOT defaults to the folder of this file)

Reads GOLDEN_ROOT/pipeline/df-a, writes GOLDEN_ROOT/pipeline/df-v2v-a: the same component folders
(byte-for-byte copies), a model_index.json written by diffusers for the video-to-video class,
io.safetensors and case.json laid out as df-a's (README-df.md), plus:
- `video`: the preprocessed input video [1, 3, F_in, H, W] in [-1, 1] (what the pipeline's VAE
  encodes the last `overlap_history` frames of);
- `frames`: the pipeline's output [1, F_in + num_frames, 3, H, W] in [0, 1]: the input video, then
  the decode of every accumulated latent frame, the re-encoded history included (upstream repeats
  the history's frames: once as given, once re-decoded).

The video extension differs from text-to-video in its first chunk only: its first
`overlap_history` latent frames are the input's last `overlap_history` frames, VAE-encoded (the
posterior mean) and normalised, a clean prefix never stepped (num_pre_ready in the step matrix),
noised by addnoise_condition like every prefix; and the first chunk stays whole in the video.

Nothing of the reference is recomputed outside diffusers: the pipeline runs through its own
__call__, the seams wrapped by make_golden_df.Recorder (every random draw, every stage, chunk by
chunk); the input is passed at the output size, so `preprocess_video` only maps [0, 1] to [-1, 1].
"""
import json
import os
import sys
import types

import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import AutoencoderKLWan, SkyReelsV2DiffusionForcingVideoToVideoPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
from transformers import AutoTokenizer, UMT5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden_df import Recorder, load_snapshot_part  # noqa: E402
from make_v2v_golden import copy_components, synthetic_video  # noqa: E402

torch.set_grad_enabled(False)

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(ROOT, "pipeline", "df-a")
DST = os.path.join(ROOT, "pipeline", "df-v2v-a")

PROMPT = "a paper boat drifting down a stream"
NEGATIVE = "low quality, blurry, static, distorted"
STEPS, GUIDANCE, SEED = 3, 5.0, 310
HEIGHT, WIDTH = 32, 32
INPUT_FRAMES = 11
# 37 frames = 10 latent: chunks of 21 frames (6 latent) overlapping by 5 (2 latent), blocks of 2:
# chunk 0 = 2 re-encoded + 4 new, chunk 1 = 2 + 4.
FRAMES, BASE, OVERLAP, AR_STEP, BLOCK, ADDNOISE, FPS = 37, 21, 5, 2, 2, 20, 24


def load_pipeline(root):
    return SkyReelsV2DiffusionForcingVideoToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch.float32).eval(),
        transformer=load_snapshot_part(SkyReelsV2Transformer3DModel, os.path.join(root, "transformer")),
        vae=load_snapshot_part(AutoencoderKLWan, os.path.join(root, "vae")),
        scheduler=UniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler"),
    )


def main():
    import diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing_v2v as v2vmod
    if not v2vmod.is_ftfy_available():
        # as make_golden_df.py: ftfy.fix_text is the identity on these plain-ASCII prompts
        v2vmod.ftfy = types.SimpleNamespace(fix_text=lambda s: s)
    copy_components(SRC, DST, load_pipeline)
    pipe = load_pipeline(DST)
    with open(os.path.join(DST, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "SkyReelsV2DiffusionForcingVideoToVideoPipeline"
    video01 = synthetic_video(INPUT_FRAMES, HEIGHT, WIDTH)
    captured = {}
    preprocess = pipe.video_processor.preprocess_video

    def preprocess_video(v, *a, **kw):
        out = preprocess(v, *a, **kw)
        captured["video"] = out.clone()
        return out

    pipe.video_processor.preprocess_video = preprocess_video
    ids = {k: torch.tensor(pipe.tokenizer(t).input_ids) for k, t in (("prompt_ids", PROMPT), ("negative_prompt_ids", NEGATIVE))}
    pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512)
    rec = Recorder(pipe)
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED + 1)  # addnoise_condition draws from the global generator (torch.randn_like)
    orig_randn_like = torch.randn_like
    torch.randn_like = rec.randn_like(orig_randn_like)
    try:
        out = pipe(video=video01.permute(0, 2, 1, 3, 4).contiguous(), prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT,
                   width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g,
                   output_type="pt", max_sequence_length=512, overlap_history=OVERLAP, addnoise_condition=ADDNOISE,
                   base_num_frames=BASE, ar_step=AR_STEP, causal_block_size=BLOCK, fps=FPS,
                   callback_on_step_end=rec.callback).frames  # [B, F_in + F, 3, H, W] in [0, 1]
    finally:
        torch.randn_like = orig_randn_like

    video = captured["video"]
    assert video.shape == (1, 3, INPUT_FRAMES, HEIGHT, WIDTH) and torch.allclose(video, video01 * 2 - 1, atol=1e-6)
    ov = (OVERLAP - 1) // 4 + 1
    io = dict(ids, video=video, prompt_embeds=pe, negative_prompt_embeds=ne, timesteps=pipe.scheduler.timesteps.clone(),
              sigmas=pipe.scheduler.sigmas.clone())
    chunks_meta, acc = [], []
    for k, c in enumerate(rec.chunks):
        n_it = c["step_matrix"].shape[0]
        assert len(c["steps"]) == n_it and len(c["dit"]) == 2 and c["prefix_frames"] == ov
        assert len(c["addnoise"]) == n_it, "every chunk has a prefix, so every iteration draws its noise"
        p = f"chunk{k}_"
        io[p + "noise"] = c["noise"]
        io[p + "latents_init"] = c["init"]
        io[p + "step_matrix"] = c["step_matrix"]
        io[p + "step_index"] = c["step_index"]
        io[p + "update_mask"] = c["update_mask"].to(torch.int64)
        io[p + "valid_interval"] = c["valid_interval"]
        io[p + "addnoise"] = torch.stack(c["addnoise"])
        io[p + "latents_after_step"] = torch.stack(c["steps"])
        io[p + "latents_final"] = c["steps"][-1]
        io[p + "dit_input_0"] = c["dit"][0]["x"]
        io[p + "dit_timestep_0"] = c["dit"][0]["t"]
        io[p + "noise_pred_cond_0"] = c["dit"][0]["out"]
        io[p + "noise_pred_uncond_0"] = c["dit"][1]["out"]
        acc.append(c["steps"][-1] if k == 0 else c["steps"][-1][:, :, ov:])
        chunks_meta.append({"latent_frames": c["noise"].shape[2], "prefix_frames": c["prefix_frames"], "iterations": n_it})
    io["latents"] = torch.cat(acc, dim=2)
    # the first chunk's prefix is the re-encoded history, never stepped: it reaches the video as is
    assert torch.equal(io["latents"][:, :, :ov], io["chunk0_latents_init"][:, :, :ov])
    io["frames"] = out
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(DST, "io.safetensors"))
    meta = {
        "what": "SkyReels-V2 DF video extension: an 11-frame video continued from its last 5 frames, 37 frames as 2 chunks of <= 21, "
                "asynchronous (ar_step 2, blocks of 2), addnoise_condition 20, 24 fps",
        "tolerance": {"rel_l2": 1e-3, "max_abs": 1e-2},
        "generator": f"tests/golden/make_df_v2v_golden.py: torch {torch.__version__}, diffusers {diffusers.__version__}, "
                     f"transformers {transformers.__version__}, float32 on CPU",
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
        "flow_shift": pipe.scheduler.config.flow_shift, "height": HEIGHT, "width": WIDTH, "num_frames": FRAMES,
        "input_frames": INPUT_FRAMES, "base_num_frames": BASE, "overlap_history": OVERLAP, "ar_step": AR_STEP,
        "causal_block_size": BLOCK, "addnoise_condition": ADDNOISE, "fps": FPS, "fps_index": 0 if FPS == 16 else 1,
        "max_sequence_length": 512, "latent_frames": io["latents"].shape[2], "overlap_history_latent_frames": ov,
        "chunks": chunks_meta,
        "io": "as pipeline/df-a (README-df.md), plus video: the preprocessed input [1, 3, F_in, H, W] in [-1, 1]; "
              "frames: [1, F_in + num_frames, 3, H, W] in [0, 1], the input then the decode of `latents`",
    }
    with open(os.path.join(DST, "case.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print("wrote", DST, "chunks:", chunks_meta, "frames:", tuple(out.shape))


if __name__ == "__main__":
    main()
