# Measures diffusers' own bf16 error on text- and image-to-video pipeline cases: every component in
# bf16, the same inputs as the f32 reference, frames compared with the reference frames; then the
# bf16 decoder alone on the reference's final latents. The figures bound Tessera's bf16 video
# tolerance (shard-worker/src/golden/dit.rs, BF16_VIDEO_TOLERANCE).
#
#   pip install torch diffusers transformers safetensors pillow ftfy accelerate
#   python measure_bf16.py ../../../shared/golden t2v-a i2v-a
import json, sys, torch
from safetensors.torch import load_file
from PIL import Image
from diffusers import WanPipeline, WanImageToVideoPipeline, AutoencoderKLWan

def stats(got, ref):
    got, ref = got.float(), ref.float()
    rel = ((got - ref).norm() / ref.norm()).item()
    mx = (got - ref).abs().max().item() / ref.abs().max().item()
    return rel, mx

root = sys.argv[1]
for name in sys.argv[2:]:
    d = f"{root}/pipeline/{name}"
    case = json.load(open(f"{d}/case.json"))
    io = load_file(f"{d}/io.safetensors")
    i2v = name.startswith("i2v")
    cls = WanImageToVideoPipeline if i2v else WanPipeline
    for dtype in (torch.float32, torch.bfloat16):
        pipe = cls.from_pretrained(d, torch_dtype=dtype)
        kw = dict(prompt=case["prompt"], negative_prompt=case.get("negative_prompt", ""), height=case["height"], width=case["width"],
                  num_frames=case["num_frames"], num_inference_steps=case["num_inference_steps"], guidance_scale=case["guidance_scale"],
                  latents=io["latents"].to(dtype), output_type="pt", max_sequence_length=512)
        if i2v:
            kw["image"] = Image.fromarray(io["image"].numpy())
        out = pipe(**kw).frames
        rel, mx = stats(out, io["frames"])
        print(f"{name} {dtype}: frames rel_l2 {rel:.3e} max_abs/max_ref {mx:.3e}", flush=True)
    # the decoder alone in bf16 on the reference's final latents
    vae = AutoencoderKLWan.from_pretrained(f"{d}/vae", torch_dtype=torch.bfloat16)
    lat = io["latents_after_step"][-1].to(torch.bfloat16)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(lat)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(lat)
    video = vae.decode(lat * std + mean, return_dict=False)[0]
    frames = ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    rel, mx = stats(frames, io["frames"])
    print(f"{name} bf16 decoder alone on the reference latents: rel_l2 {rel:.3e} max_abs/max_ref {mx:.3e}", flush=True)
