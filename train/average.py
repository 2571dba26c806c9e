"""The mean of two or more transformer snapshots' weights (the same architecture, one run warm-started
from the other), written as a copy of the first folder with the averaged transformer. The demo
model's transformer is the mean of its last two runs (train/README.md says which).

    python train/average.py OUT SNAPSHOT_A SNAPSHOT_B [...]
"""

import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


def main():
    out, sources = sys.argv[1], sys.argv[2:]
    if len(sources) < 2:
        sys.exit(__doc__)
    states = [load_file(os.path.join(s, WEIGHTS)) for s in sources]
    keys = set(states[0])
    for s, state in zip(sources[1:], states[1:]):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            sys.exit(f"{s}: not the same transformer as {sources[0]}")
    mean = {k: (sum(state[k].double() for state in states) / len(states)).to(states[0][k].dtype) for k in sorted(keys)}
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(sources[0], out)
    save_file(mean, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
    print(f"{out}: the mean of {len(states)} transformers ({sum(v.numel() for v in mean.values())} weights)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
