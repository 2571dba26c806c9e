"""A frame strip for the README: every `step`-th PNG frame of the folders given (each one row), side
by side, scaled up without smoothing.

    tessera generate --prompt "a red ball moving right" -o frames/
    python train/strip.py out.png frames/ [more_frames/ ...]
"""

import os
import sys

import numpy as np
from PIL import Image


def row(folder, step):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))[::step]
    return np.concatenate([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names], axis=1)


def main():
    out, folders = sys.argv[1], sys.argv[2:]
    step, scale, gap = 4, 3, 4
    rows = [row(f, step) for f in folders]
    width = max(r.shape[1] for r in rows)
    pad = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    img = Image.fromarray(np.concatenate(pad, axis=0)[:-gap])
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(out)


if __name__ == "__main__":
    main()
