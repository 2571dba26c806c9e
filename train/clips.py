"""Clips drawn by a program: a colored shape moving in one direction over a plain or textured
background, captioned `a {color} {shape} moving {direction}`.

Everything a clip shows follows from its seed (numpy's PCG64): the caption's three words, the
shape's size, its speed, where it starts, and the background. The same seed gives the same bytes
on every machine. Frames are uint8 RGB, `[frames, height, width, 3]`.

The palette and the background are chosen so that a pixel's color says whether it belongs to the
shape: every background pixel is farther than `BACKGROUND_MARGIN` (Euclidean, 0-255 RGB) from
every shape color. The Rust check of the output (`shard-worker/src/pipeline/demo.rs`) relies on it.
"""

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
}
SHAPES = ("ball", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

FRAMES = 17
FPS = 16
SIZE = 64
# The minimum RGB distance between any background pixel and any shape color.
BACKGROUND_MARGIN = 100.0


def caption(color, shape, direction):
    return f"a {color} {shape} moving {direction}"


def all_prompts():
    """The 60 captions, in a fixed order (color, then shape, then direction)."""
    return [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def _background(rng, size):
    """A dark, low-saturation background: plain, or with a soft texture (stripes, checks or
    noise). Returns float RGB in 0-255, `[size, size, 3]`."""
    base = rng.uniform(15, 80)
    tint = rng.uniform(-12, 12, size=3)
    color = np.clip(base + tint, 0, 255)
    img = np.broadcast_to(color, (size, size, 3)).astype(np.float64).copy()
    kind = rng.integers(0, 4)  # 0 plain, 1 stripes, 2 checks, 3 noise
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    amp = rng.uniform(6, 18)
    if kind == 1:
        period = rng.uniform(6, 16)
        angle = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        img += amp * wave[..., None]
    elif kind == 2:
        cell = int(rng.integers(4, 12))
        checks = ((yy // cell + xx // cell) % 2) * 2 - 1
        img += amp * checks[..., None]
    elif kind == 3:
        coarse = rng.normal(0, 1, size=(size // 8 + 1, size // 8 + 1))
        noise = np.clip(np.kron(coarse, np.ones((8, 8)))[:size, :size], -1.5, 1.5)
        img += amp * noise[..., None]
    return np.clip(img, 0, 255)


def _coverage(shape, cx, cy, r, size, supersample=4):
    """The fraction of each pixel the shape covers (anti-aliased by supersampling)."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / supersample
    yy, xx = np.meshgrid(c, c, indexing="ij")
    dx, dy = xx - cx, yy - cy
    if shape == "ball":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    else:  # triangle, pointing up, centered on its centroid
        h = 1.5 * r
        top, bottom = -2.0 * h / 3.0, h / 3.0
        half = (dy - top) / (bottom - top) * r * 1.1
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def clip(seed, color=None, shape=None, direction=None, frames=FRAMES, size=SIZE):
    """The clip of `seed`: (uint8 frames [F, H, W, 3], caption). Color, shape and direction are
    drawn from the seed unless given."""
    rng = np.random.Generator(np.random.PCG64(seed))
    names = list(COLORS), list(SHAPES), list(DIRECTIONS)
    picks = [int(rng.integers(0, len(n))) for n in names]
    color = color or names[0][picks[0]]
    shape = shape or names[1][picks[1]]
    direction = direction or names[2][picks[2]]
    r = rng.uniform(0.09, 0.16) * size
    # the whole path: 40 % to 60 % of the frame over the clip, kept inside it
    travel = rng.uniform(0.40, 0.60) * size
    dx, dy = DIRECTIONS[direction]
    lo, hi = r + 1, size - r - 1
    along_start = rng.uniform(lo, hi - travel) if hi - travel > lo else lo
    across = rng.uniform(lo, hi)
    bg = _background(rng, size)
    rgb = np.array(COLORS[color], dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        along = along_start + travel * f / (frames - 1)
        if dx != 0:
            cx = along if dx > 0 else size - along
            cy = across
        else:
            cy = along if dy > 0 else size - along
            cx = across
        a = _coverage(shape, cx, cy, r, size)[..., None]
        out[f] = np.round(bg * (1 - a) + rgb * a).astype(np.uint8)
    return out, caption(color, shape, direction)


def background_margin_holds(seeds=range(200), size=SIZE):
    """The smallest distance from a background pixel to a shape color over `seeds`."""
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    worst = np.inf
    for s in seeds:
        bg = _background(np.random.Generator(np.random.PCG64(s)), size).reshape(-1, 1, 3)
        worst = min(worst, np.sqrt(((bg - palette[None]) ** 2).sum(-1)).min())
    return worst


if __name__ == "__main__":
    import sys

    print("background margin over 200 seeds:", round(background_margin_holds(), 1), ">=", BACKGROUND_MARGIN)
    if len(sys.argv) > 1:
        from PIL import Image

        frames, text = clip(int(sys.argv[1]))
        strip = np.concatenate(list(frames[::4]), axis=1)
        Image.fromarray(strip).save(sys.argv[2] if len(sys.argv) > 2 else "clip.png")
        print(text)
