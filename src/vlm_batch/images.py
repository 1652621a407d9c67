"""Opening an item's image as the RGB picture every model takes, or a clear error naming why not.

Odd but valid images (CMYK, 16-bit, palette with transparency, grayscale, 1x1, very large) are
converted; broken ones raise ImageError, which the pipeline records against that item alone.
"""

from __future__ import annotations

import os

MAX_PIXELS = 100_000_000   # beyond this a "valid" image is a decompression bomb, not a benchmark item


class ImageError(ValueError):
    pass


def _flatten(img):
    """RGB over white, whatever mode and transparency the file had."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8"), "L")
    elif img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        img = Image.fromarray(((arr - lo) * (255.0 / ((hi - lo) or 1.0))).astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


_written: dict = {}   # path -> the picture just written there, for the open that follows (`written`)
KEEP_WRITTEN = 64


def written(path: str, picture) -> None:
    """The picture just saved, losslessly, at `path`: opening `path` next gives it without decoding the
    file again (20 ms for a 1024x768 PNG). Only modes a PNG gives back as they were."""
    if picture.mode not in ("RGB", "L") or picture.width * picture.height > MAX_PIXELS:
        return
    _written[path] = (os.stat(path).st_mtime_ns, picture)
    while len(_written) > KEEP_WRITTEN:   # rows that failed before opening theirs
        _written.pop(next(iter(_written)))


def open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    kept = _written.pop(path, None)
    if kept is not None and os.path.exists(path) and os.stat(path).st_mtime_ns == kept[0]:
        return _flatten(kept[1])
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"image too large: {img.width}x{img.height} pixels in {path}")
            img.load()
            return _flatten(img)
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image: {path}") from exc
    except (OSError, SyntaxError) as exc:
        raise ImageError(f"unreadable image {path}: {exc}") from exc


def decode_base64(data: str):
    """An image column's base64 text as an RGB picture, or an ImageError saying what is wrong."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(str(data), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image column is not valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"image too large: {img.width}x{img.height} pixels")
            img.load()
            return _flatten(img)
    except UnidentifiedImageError as exc:
        raise ImageError("image column is valid base64 but not an image") from exc
    except (OSError, SyntaxError) as exc:
        raise ImageError(f"image is truncated or corrupt ({exc})") from exc
