"""Makes pil_lanczos.bin: PIL's LANCZOS resize of a 37x23 RGB test pattern (the one `pattern` in
resize.rs builds) to 16x10 and to 53x31, each stored planar [3, H, W] as 8-bit samples, one after
the other. Run: python3 pil_lanczos.py (needs Pillow and NumPy)."""
import math

import numpy as np
from PIL import Image

W, H = 37, 23
src = np.zeros((3, H, W), dtype=np.uint8)
for c in range(3):
    for y in range(H):
        for x in range(W):
            smooth = 128.0 + 100.0 * (math.sin(x * 0.31 + c) * math.cos(y * 0.23))
            edge = 60.0 if (x // 5 + y // 4 + c) % 2 == 0 else -60.0
            # Rust's f64::round rounds halves away from zero; no sample here is a half.
            src[c, y, x] = int(math.floor(min(max(smooth + edge, 0.0), 255.0) + 0.5))
img = Image.fromarray(np.ascontiguousarray(src.transpose(1, 2, 0)), "RGB")
out = b""
for size in [(16, 10), (53, 31)]:
    r = np.asarray(img.resize(size, Image.LANCZOS)).transpose(2, 0, 1)
    out += np.ascontiguousarray(r).tobytes()
open("pil_lanczos.bin", "wb").write(out)
print(len(out), "bytes")
