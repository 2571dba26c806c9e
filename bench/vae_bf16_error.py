"""How far diffusers' own Wan VAE lands from the f32 reference when it runs in bf16: the yardstick
behind `golden::BF16_VAE_TOLERANCE` (shard-worker/src/golden/vae.rs).

    python3 bench/vae_bf16_error.py [CASE_DIR]   # default: ../shared/golden/vae/decode-a

Prints rel_l2 and max_abs / max|ref| of the bf16 decode (and encode, when the case has
`video_in`) against the case's f32 outputs. Needs torch, diffusers, safetensors.
"""
import sys

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file


def errors(got, want):
    got, want = got.float(), want.float()
    return (got - want).norm().item() / want.norm().item(), (got - want).abs().max().item() / want.abs().max().item()


def main():
    case = sys.argv[1] if len(sys.argv) > 1 else "../shared/golden/vae/decode-a"
    io = load_file(f"{case}/io.safetensors")
    vae = AutoencoderKLWan.from_pretrained(case, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        video = vae.decode(io["latent"].to(torch.bfloat16)).sample.clamp(-1, 1)
        print("decode  rel_l2 %.3e  max_abs/max|ref| %.3e" % errors(video, io["video"]))
        if "video_in" in io:
            dist = vae.encode(io["video_in"].to(torch.bfloat16)).latent_dist
            print("mean    rel_l2 %.3e  max_abs/max|ref| %.3e" % errors(dist.mean, io["latent_mean"]))
            print("logvar  rel_l2 %.3e  max_abs/max|ref| %.3e" % errors(dist.logvar, io["latent_logvar"]))


if __name__ == "__main__":
    main()
