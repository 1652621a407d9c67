"""Molmo's image processor, written from the published design:

- a global view: the whole image resized (aspect kept, padded) to one 336x336 crop;
- high-resolution crops: the image resized (aspect kept, padded) to a grid of `rows x cols` windows
  of 224 px plus a 56-px margin on each side, cut into overlapping 336x336 crops with a 224-px
  stride, the grid chosen among those of at most `max_crops` crops as the one that needs the least
  up-scaling (or, if every one down-scales, the least down-scaling);
- each crop cut into 24x24 patches of 14x14x3 pixels, and a per-patch mask (the fraction of the
  patch that is image, not padding);
- the ViT's patch features are pooled 2x2, so a crop gives 12x12 features; of a high-resolution
  crop only the features outside the overlap margins are kept (the outer crops keep their outer
  margin), so the kept features tile the resized image once;
- image tokens: `<im_start>`, 12 rows of (12 `<im_patch>` + `<im_col>`), `<im_end>` for the global
  view, then the same layout for the joint grid of the kept high-resolution features;
- `image_input_idx[crop, feature]`: the position of the `<im_patch>` token a pooled feature fills
  (or -1 where a feature is dropped).

The selection rule and token layout are the ones vLLM's `MolmoForCausalLM` re-derives from
`max_crops`, `overlap_margins`, `base_image_input_size`, `image_patch_size` and
`image_token_length_w/h`, so both must agree.
"""

from typing import List, Optional

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
POOLING = 2


class MolmoImagesKwargs(ImagesKwargs, total=False):
    max_crops: Optional[int]
    overlap_margins: Optional[List[int]]
    base_image_input_size: Optional[List[int]]
    image_token_length_w: Optional[int]
    image_token_length_h: Optional[int]
    image_patch_size: Optional[int]
    image_padding_mask: Optional[bool]


OPTIONS = ("max_crops", "overlap_margins", "base_image_input_size", "image_token_length_w",
           "image_token_length_h", "image_patch_size", "image_padding_mask")


def candidate_tilings(max_crops: int) -> list:
    """(rows, cols) grids of at most `max_crops` crops, fewest crops first (rows-major within a count)."""
    grids = [(r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops]
    return sorted(grids, key=lambda g: g[0] * g[1])


def select_tiling(height: float, width: float, window: int, max_crops: int) -> tuple:
    """The grid whose windows cover (height, width) with the least up-scaling; if every grid needs
    down-scaling, the one that down-scales least. Computed in float32, first candidate on ties."""
    grids = np.array(candidate_tilings(max_crops), dtype=np.int32)
    size = np.array([height, width], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = ((grids * window).astype(np.float32) / size).min(axis=-1)
    if (scale < 1).all():
        pick = scale.argmax()
    else:
        pick = np.where(scale < 1.0, np.float32(1e10), scale).argmin()
    rows, cols = grids[pick]
    return int(rows), int(cols)


def _to_rgb_array(image) -> np.ndarray:
    """A PIL image or an HxWx3 array as uint8 HxWx3."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return array[..., :3]


def resize_and_pad(image: np.ndarray, height: int, width: int, mean, std):
    """The image scaled (aspect kept, bilinear) to fit (height, width), normalized, centred on a zero
    canvas; and the canvas mask (1 where the image is)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    new_h = min(height, max(1, round(h * scale)))
    new_w = min(width, max(1, round(w * scale)))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    resized = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.float32)
    canvas[top:top + new_h, left:left + new_w] = resized
    mask[top:top + new_h, left:left + new_w] = 1.0
    return canvas, mask


def patchify(crop: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p*p*C): patches row-major, each flattened (row, column, channel)."""
    h, w, c = crop.shape
    x = crop.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


class MolmoImageProcessor(BaseImageProcessor):
    model_input_names = ["images", "image_masks", "image_input_idx"]
    valid_kwargs = MolmoImagesKwargs

    def __init__(
        self,
        max_crops: int = 12,
        overlap_margins=(4, 4),
        base_image_input_size=(336, 336),
        image_token_length_w: int = 12,
        image_token_length_h: int = 12,
        image_patch_size: int = 14,
        image_padding_mask: bool = True,
        do_normalize: bool = True,
        image_mean=None,
        image_std=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_crops = max_crops
        self.overlap_margins = list(overlap_margins)
        self.base_image_input_size = list(base_image_input_size)
        self.image_token_length_w = image_token_length_w
        self.image_token_length_h = image_token_length_h
        self.image_patch_size = image_patch_size
        self.image_padding_mask = image_padding_mask
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)

    def options(self, **overrides) -> dict:
        """This processor's settings, with any non-None overrides."""
        opts = {name: getattr(self, name) for name in OPTIONS}
        opts.update({k: v for k, v in overrides.items() if k in OPTIONS and v is not None})
        return opts

    def image_to_patches_and_tokens(self, image, patch_id: int, col_id: int, start_id: int, end_id: int,
                                    **overrides):
        """One image -> (crops (n, P, p*p*3), masks (n, P), image_input_idx (n, F) relative to the
        image's first token, the image's token ids). Crop 0 is the global view."""
        o = self.options(**overrides)
        patch = o["image_patch_size"]
        base_h, base_w = o["base_image_input_size"]
        left, right = o["overlap_margins"]
        if base_h != base_w or base_h % patch or left % POOLING or right % POOLING:
            raise ValueError("Molmo needs square crops of whole patches and margins of whole pooled patches")
        crop_patches = base_h // patch                          # 24
        crop_feats = crop_patches // POOLING                    # 12 pooled features a side
        window = (crop_patches - left - right) * patch          # 224 px
        margin_px = (left + right) * patch                      # 112 px
        mean, std = (self.image_mean, self.image_std) if self.do_normalize else ([0.0] * 3, [1.0] * 3)

        pixels = _to_rgb_array(image)
        h, w = pixels.shape[:2]
        rows, cols = select_tiling(h - margin_px, w - margin_px, window, o["max_crops"])

        # The global view, then the high-resolution crops.
        views = [resize_and_pad(pixels, base_h, base_w, mean, std)]
        canvas, canvas_mask = resize_and_pad(pixels, rows * window + margin_px, cols * window + margin_px, mean, std)
        for r in range(rows):
            for c in range(cols):
                y, x = r * window, c * window
                views.append((canvas[y:y + base_h, x:x + base_w], canvas_mask[y:y + base_h, x:x + base_w]))
        crops = np.stack([patchify(v, patch) for v, _ in views])
        masks = np.stack([patchify(m[..., None], patch).mean(-1) for _, m in views])
        if not o["image_padding_mask"]:
            masks = np.ones_like(masks)     # no padding embeddings added anywhere

        # Token layout: the global block, then the joint block of the kept high-resolution features.
        tw, th = o["image_token_length_w"], o["image_token_length_h"]
        if (tw, th) != (crop_feats, crop_feats):
            raise ValueError("image_token_length_w/h must equal the pooled features of a crop side")
        global_block = [start_id] + ([patch_id] * tw + [col_id]) * th + [end_id]
        win_f, left_f, right_f = window // patch // POOLING, left // POOLING, right // POOLING
        joint_rows, joint_cols = rows * win_f + left_f + right_f, cols * win_f + left_f + right_f
        joint_block = [start_id] + ([patch_id] * joint_cols + [col_id]) * joint_rows + [end_id]

        idx = np.full((len(views), crop_feats * crop_feats), -1, np.int64)
        fi, fj = np.divmod(np.arange(crop_feats * crop_feats), crop_feats)
        idx[0] = 1 + fi * (tw + 1) + fj
        joint_start = len(global_block)
        for r in range(rows):
            for c in range(cols):
                top = 0 if r == 0 else left_f
                bottom = crop_feats if r == rows - 1 else crop_feats - right_f
                first = 0 if c == 0 else left_f
                last = crop_feats if c == cols - 1 else crop_feats - right_f
                kept = (fi >= top) & (fi < bottom) & (fj >= first) & (fj < last)
                grid_r, grid_c = r * win_f + fi, c * win_f + fj
                pos = joint_start + 1 + grid_r * (joint_cols + 1) + grid_c
                idx[1 + r * cols + c] = np.where(kept, pos, -1)
        return crops, masks, idx, global_block + joint_block

    def multimodal_preprocess(self, images, tokens, patch_id: int, col_id: int, start_id: int, end_id: int,
                              image_prompt_id: Optional[int] = None, **overrides):
        """Token ids with each image's tokens in place of its `<|image|>` token (or, without any, all
        images at the start), and the images' crops, masks and feature positions in that sequence."""
        tokens = list(tokens)
        spots = [i for i, t in enumerate(tokens) if image_prompt_id is not None and t == image_prompt_id]
        if spots and len(spots) != len(images):
            raise ValueError(f"{len(spots)} image prompt tokens for {len(images)} images")
        out, all_crops, all_masks, all_idx, prev = [], [], [], [], 0
        for n, image in enumerate(images):
            crops, masks, idx, image_tokens = self.image_to_patches_and_tokens(
                image, patch_id, col_id, start_id, end_id, **overrides)
            if spots:
                out += tokens[prev:spots[n]]
                prev = spots[n] + 1
            all_idx.append(np.where(idx >= 0, idx + len(out), -1))
            out += image_tokens
            all_crops.append(crops)
            all_masks.append(masks)
        out += tokens[prev:]
        return {
            "input_ids": np.asarray(out, np.int64),
            "images": np.concatenate(all_crops).astype(np.float32),
            "image_masks": np.concatenate(all_masks).astype(np.float32),
            "image_input_idx": np.concatenate(all_idx),
        }

    def preprocess(self, images, **overrides):
        """Images alone (no text): crops, masks and feature positions among the image tokens, with
        placeholder token ids (0-3 for patch, column, start, end)."""
        from transformers import BatchFeature

        if not isinstance(images, (list, tuple)):
            images = [images]
        data = self.multimodal_preprocess(images, [], 0, 1, 2, 3, **overrides)
        data.pop("input_ids")
        return BatchFeature({k: torch.from_numpy(v) for k, v in data.items()})
