"""How many bytes a request needs, and how many requests fit in a batch.

The default reads the checkpoint's config: KV bytes per token (layers x KV heads x head dim x 2 x
dtype size) times the tokens a request holds at its longest (text + image tokens + new tokens).
Plugins refine the image-token count, the one part that differs most between families.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}


@functools.lru_cache(maxsize=32)
def _read_config(path: str) -> dict:
    local = os.path.join(path, "config.json")
    if not os.path.exists(local):
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(path, "config.json")
    with open(local) as fh:
        return json.load(fh)


def model_config(card) -> dict:
    return _read_config(card.path())


def text_config(cfg: dict) -> dict:
    """The language model's part of a multimodal config, wherever the family keeps it."""
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(cfg.get(key), dict):
            return {**cfg, **cfg[key]}
    return cfg


def dtype_bytes(cfg: dict, dtype: str | None = None) -> int:
    name = str(dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return DTYPE_BYTES.get(name, 2)


def kv_bytes_per_token(cfg: dict, dtype: str | None = None) -> int:
    t = text_config(cfg)
    layers = t.get("num_hidden_layers") or t.get("n_layers") or t.get("num_layers")
    heads = t.get("num_attention_heads") or t.get("n_heads")
    kv_heads = t.get("num_key_value_heads") or heads
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    return int(layers) * int(kv_heads) * int(head_dim) * 2 * dtype_bytes(cfg, dtype)


def default_image_tokens(card, width: int, height: int) -> int:
    """Patches after merging, for ViT-style encoders; a plugin knows its processor better."""
    vision = model_config(card).get("vision_config") or {}
    patch = vision.get("patch_size") or 14
    merge = vision.get("spatial_merge_size") or 1
    return max(1, math.ceil(width / patch) * math.ceil(height / patch) // (merge * merge))


def approx_text_tokens(prompt: str) -> int:
    """Without a tokenizer at hand: words and punctuation, a slight overestimate for English BPE."""
    return len(re.findall(r"\w+|[^\w\s]", prompt))


def prompt_tokens(card, request) -> int:
    """The prompt's tokens, images included, without loading a tokenizer."""
    from .plugins import pm

    return approx_text_tokens(request.prompt) + sum(
        pm.hook.vlm_batch_image_tokens(card=card, width=im.width, height=im.height) for im in request.images)


def request_tokens(card, request) -> int:
    """Tokens a request holds at its longest: its prompt (images included) plus all new tokens."""
    return (request.prompt_tokens or prompt_tokens(card, request)) + request.max_new_tokens


def activation_bytes_per_token(cfg: dict, dtype: str | None = None) -> int:
    """Transient per-token memory of one layer's forward pass (residual, attention and MLP)."""
    t = text_config(cfg)
    hidden = int(t.get("hidden_size") or 0)
    inter = int(t.get("intermediate_size") or 4 * hidden)
    return (2 * hidden + 2 * inter) * dtype_bytes(cfg, dtype)


def estimate_request_bytes(card, request, dtype: str | None = None) -> int:
    cfg = model_config(card)
    return request_tokens(card, request) * (kv_bytes_per_token(cfg, dtype) + activation_bytes_per_token(cfg, dtype))


def parse_size(text: str | None) -> int | None:
    """'8GiB', '512MB', '1e9' -> bytes."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([\d.e+]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 8GiB or 512MB)")
    unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    if m.group(2) and not m.group(3).lower().startswith("i"):
        unit = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)
