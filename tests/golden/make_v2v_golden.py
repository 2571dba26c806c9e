"""Golden case pipeline/v2v-a: diffusers' WanVideoToVideoPipeline (reference/wan2.1.md §6.2) on the
components of pipeline/t2v-a, float32 on CPU.

usage: python make_v2v_golden.py [GOLDEN_ROOT]     (GOLDEN_ROOT defaults to the folder of this file)

Reads GOLDEN_ROOT/pipeline/t2v-a, writes GOLDEN_ROOT/pipeline/v2v-a: the same component folders
(byte-for-byte copies), a model_index.json written by diffusers for WanVideoToVideoPipeline,
io.safetensors with the inputs and every stage's reference, and case.json.

Nothing of the reference is recomputed outside diffusers: the pipeline is loaded from the written
case folder and run through its own __call__; the stages are captured on the way:
- the input video is passed as a 5-D tensor [B, F, 3, H, W] in [0, 1] already at the output size, so
  `video_processor.preprocess_video` does no resizing, only `2x - 1` and the transpose to
  [B, 3, F, H, W]; its output, exactly what the VAE encodes, is captured and stored as `video`;
- `randn_tensor` of the pipeline module is wrapped to keep the noise it draws (from a seeded
  generator);
- `scheduler.add_noise` is wrapped to keep its arguments and result: `init_latents` (the VAE mean of
  the input, normalised with latents_mean/std) and `latents` (the noised start of denoising);
- `callback_on_step_end` keeps the latents after every step run.
"""
import json
import math
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel, WanVideoToVideoPipeline
from diffusers.pipelines.wan import pipeline_wan_video2video as v2v_module
from transformers import AutoTokenizer, UMT5EncoderModel

torch.set_grad_enabled(False)

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(ROOT, "pipeline", "t2v-a")
DST = os.path.join(ROOT, "pipeline", "v2v-a")
COMPONENTS = ["scheduler", "text_encoder", "tokenizer", "transformer", "vae"]

PROMPT = "a paper boat drifting down a stream"
NEGATIVE = "low quality, blurry, static, distorted"
STEPS, STRENGTH, GUIDANCE, SEED = 5, 0.7, 5.0, 12
HEIGHT, WIDTH, FRAMES = 32, 32, 9


def synthetic_video(frames=FRAMES, height=HEIGHT, width=WIDTH):
    """A smooth moving pattern [1, 3, F, H, W] strictly inside [0, 1], different per channel."""
    c = torch.arange(3, dtype=torch.float64).view(3, 1, 1, 1)
    f = torch.arange(frames, dtype=torch.float64).view(1, frames, 1, 1)
    y = torch.arange(height, dtype=torch.float64).view(1, 1, height, 1) / height
    x = torch.arange(width, dtype=torch.float64).view(1, 1, 1, width) / width
    wave = torch.sin(2 * math.pi * ((c + 1) * x + 0.5 * y) + 0.35 * f + c)
    blob = torch.exp(-(((x - 0.3 - 0.05 * f) ** 2 + (y - 0.6 + 0.03 * f) ** 2) / 0.02))
    v = 0.5 + 0.3 * wave + 0.17 * blob - 0.05 * c
    assert 0.0 < v.min() and v.max() < 1.0
    return v.to(torch.float32).unsqueeze(0)


def load_diffusers_model(cls, root, sub):
    """A diffusers model from its snapshot folder: built from config.json, weights loaded strictly
    (diffusers' own from_pretrained needs `accelerate` for these classes)."""
    d = os.path.join(root, sub)
    model = cls.from_config(cls.load_config(d))
    model.load_state_dict(load_file(os.path.join(d, "diffusion_pytorch_model.safetensors")), strict=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def load_pipeline(root):
    """WanVideoToVideoPipeline from the component folders of `root`."""
    return WanVideoToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch.float32).eval(),
        transformer=load_diffusers_model(WanTransformer3DModel, root, "transformer"),
        vae=load_diffusers_model(AutoencoderKLWan, root, "vae"),
        scheduler=UniPCMultistepScheduler.from_pretrained(root, subfolder="scheduler"),
    )


def copy_components(src=SRC, dst=DST, load=load_pipeline):
    """The component folders of case `src` copied into `dst`, with the model_index.json diffusers
    writes for the pipeline `load` makes of them."""
    os.makedirs(dst, exist_ok=True)
    for comp in COMPONENTS:
        to = os.path.join(dst, comp)
        if os.path.exists(to):
            shutil.rmtree(to)
        shutil.copytree(os.path.join(src, comp), to, symlinks=False)
    # model_index.json as diffusers writes it for this pipeline class
    pipe = load(src)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "model_index.json")) as f:
            index = json.load(f)
    assert index["_class_name"] == type(pipe).__name__, index
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def main():
    copy_components()
    pipe = load_pipeline(DST)
    with open(os.path.join(DST, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == type(pipe).__name__
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    video01 = synthetic_video()  # [1, 3, F, H, W] in [0, 1]
    captured = {}

    preprocess = pipe.video_processor.preprocess_video

    def preprocess_video(v, *a, **kw):
        out = preprocess(v, *a, **kw)
        captured["preprocessed"] = out.clone()
        return out

    pipe.video_processor.preprocess_video = preprocess_video

    draw = v2v_module.randn_tensor

    def randn_tensor(*a, **kw):
        out = draw(*a, **kw)
        assert "noise" not in captured, "the pipeline drew noise twice"
        captured["noise"] = out.clone()
        return out

    v2v_module.randn_tensor = randn_tensor

    add_noise = pipe.scheduler.add_noise

    def add_noise_hook(original, noise, timesteps):
        out = add_noise(original, noise, timesteps)
        captured.update(init_latents=original.clone(), add_noise_noise=noise.clone(), latent_timestep=timesteps.clone(), latents=out.clone())
        return out

    pipe.scheduler.add_noise = add_noise_hook

    steps_seen, timesteps_seen = [], []

    def grab(p, i, t, kw):
        steps_seen.append(kw["latents"].clone())
        timesteps_seen.append(int(t))
        return kw

    ids = {k: torch.tensor(pipe.tokenizer(t).input_ids) for k, t in (("prompt_ids", PROMPT), ("negative_prompt_ids", NEGATIVE))}
    pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512)
    frames = pipe(
        video=video01.permute(0, 2, 1, 3, 4).contiguous(),  # [B, F, 3, H, W], the layout preprocess_video takes
        prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, strength=STRENGTH, generator=torch.Generator().manual_seed(SEED),
        output_type="pt", max_sequence_length=512, callback_on_step_end=grab,
    ).frames  # [B, F, 3, H, W] in [0, 1]
    v2v_module.randn_tensor = draw

    video = captured["preprocessed"]
    assert video.shape == (1, 3, FRAMES, HEIGHT, WIDTH) and torch.allclose(video, video01 * 2 - 1, atol=1e-6), "preprocess_video did more than 2x - 1"
    assert torch.equal(captured["add_noise_noise"], captured["noise"]), "add_noise got other noise than randn_tensor drew"
    init = min(int(STEPS * STRENGTH), STEPS)
    t_start = STEPS - init
    pipe.scheduler.set_timesteps(STEPS)
    kept = pipe.scheduler.timesteps[t_start:]
    assert timesteps_seen == kept.tolist(), (timesteps_seen, kept)
    assert int(captured["latent_timestep"][0]) == int(kept[0])
    assert len(steps_seen) == init

    io = dict(ids, video=video, noise=captured["noise"], prompt_embeds=pe, negative_prompt_embeds=ne,
              init_latents=captured["init_latents"], latents=captured["latents"], timesteps=kept.to(torch.int64),
              latents_after_step=torch.stack(steps_seen), frames=frames)
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(DST, "io.safetensors"))

    meta = {
        "what": "WanVideoToVideoPipeline video-to-video, float32",
        "tolerance": {"rel_l2": 1e-3, "max_abs": 1e-2},
        "generator": f"tests/golden/make_v2v_golden.py: torch {torch.__version__}, diffusers {diffusers.__version__}, "
                     f"transformers {transformers.__version__}, float32 on CPU",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "num_inference_steps": STEPS,
        "strength": STRENGTH,
        "guidance_scale": GUIDANCE,
        "flow_shift": pipe.scheduler.config.flow_shift,
        "height": HEIGHT,
        "width": WIDTH,
        "num_frames": FRAMES,
        "seed": SEED,
        "io": "video: the preprocessed input [1, 3, F, H, W] in [-1, 1]; noise: the noise drawn for add_noise, latent-shaped; "
              "prompt_ids/negative_prompt_ids: token ids; prompt_embeds/negative_prompt_embeds: [1, 512, text_dim], zero past each prompt; "
              "init_latents: VAE mean of the video normalised with latents_mean/std, before noising; "
              "latents: add_noise(init_latents, noise, timesteps[0]), the start of denoising; "
              "timesteps: the kept timesteps timesteps[t_start:] (int64), t_start = N - min(int(N*strength), N); "
              "latents_after_step[i]: latents after the i-th step run; frames: [B, F, 3, H, W] in [0, 1]",
    }
    with open(os.path.join(DST, "case.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print("wrote", DST, "steps run:", timesteps_seen)


if __name__ == "__main__":
    main()
