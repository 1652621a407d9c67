"""Photo-sized sets for measuring speed on inputs shaped like real benchmarks' (MMBench, SEED-Bench,
ChartQA and DocVQA carry photos and scans of 500-2000 px, JPEGs of 100-300 KB): the sample set's
questions, each shape drawn large on a textured, noisy background, saved as a JPEG of that size.

    VLMBatchPhotos   640 rows, 1024x768 JPEGs (about 120 KB each)
    VLMBatchScans    160 rows, 2000x1500 JPEGs (about 450 KB each)

Generating them takes a while (tens of seconds), so a set is written once into `$LMUData` and reused
while its version file says it is this version's; they are not part of the default suite.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

from . import sample_data

VERSION = "1"
SIZES = {"VLMBatchPhotos": ((1024, 768), 640), "VLMBatchScans": ((2000, 1500), 160)}


def photo(shape: str, colour: str, size: tuple, rng: random.Random):
    """A picture the size of a photo: a lit gradient, soft clutter, sensor-like noise, and the shape."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    gen = np.random.default_rng(rng.getrandbits(32))
    sw, sh = w // 8, h // 8   # the out-of-focus background is drawn small, blurred, then enlarged
    base = np.array([rng.randint(140, 230) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(-40, 40, sw, dtype=np.float32)[None, :, None] * rng.choice([-1, 1]) + \
        np.linspace(-25, 25, sh, dtype=np.float32)[:, None, None]
    small = Image.fromarray(np.clip(base + ramp, 0, 255).astype("uint8"), "RGB")
    clutter = ImageDraw.Draw(small)
    for _ in range(12):   # objects behind the subject
        x, y, r = rng.randrange(sw), rng.randrange(sh), rng.randint(sw // 20 + 1, sw // 6 + 2)
        clutter.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(60, 250) for _ in range(3)))
    img = small.filter(ImageFilter.GaussianBlur(radius=sw / 120 + 0.8)).resize((w, h), Image.BILINEAR)
    subject = sample_data.draw(shape, colour, rng, size=min(w, h)).convert("RGBA")
    subject.putalpha(Image.eval(subject.convert("L"), lambda v: 255 if v < 215 else 0))   # the shape only
    img.paste(subject, ((w - subject.width) // 2, (h - subject.height) // 2), subject)
    noise = (gen.standard_normal((h, w, 3), dtype=np.float32) * 7).astype(np.int16)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype("uint8"), "RGB")


def rows(name: str, seed: int = 0, n: int | None = None) -> list[dict]:
    """The sample set's multiple-choice rows, each image a photo-sized JPEG of the same shape and colour."""
    size, count = SIZES[name]
    n = n or count
    rng = random.Random(seed)
    out = []
    for row, shape, colour in sample_data.items(n, seed):
        buf = io.BytesIO()
        photo(shape, colour, size, rng).save(buf, format="JPEG", quality=85)
        out.append(dict(row, image=base64.b64encode(buf.getvalue()).decode()))
    return out


def ensure(name: str, root: Path) -> Path:
    """Write the set into `root` unless this version of it is there already."""
    path, stamp = root / f"{name}.tsv", root / f".{name}.version"
    if path.exists() and stamp.exists() and stamp.read_text() == VERSION:
        return path
    sample_data.write_tsv(path, rows(name))
    stamp.write_text(VERSION)
    return path


def is_photo_set(name: str) -> bool:
    return name in SIZES
