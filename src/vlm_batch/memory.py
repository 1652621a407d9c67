"""How many bytes a request needs, and how many requests fit in a batch.

A request's KV: per layer, KV heads x head dim x 2 x dtype size for each token the layer keeps,
over the tokens a request holds at its longest (text + image tokens + new tokens). The default
counts every layer as full attention and images as ViT patches; a family says what its layers keep
(`spans`: all tokens, a sliding or chunked window, or a linear-attention state of fixed size) and
how its processor counts image tokens. Activations are added where batches are sized (`batch_bytes`).
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
    """The checkpoint's config with transformers' defaults filled in where it knows the architecture:
    hub configs often name only what differs from them (a text_config without head counts, no
    `layer_types` in configs saved before it existed). Remote-code architectures: config.json as it is."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict()
    except (ValueError, KeyError, OSError, ImportError):
        pass
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
        if isinstance(cfg.get(key), dict):   # a None there is unset (the dtype lives on the outer config)
            return {**cfg, **{k: v for k, v in cfg[key].items() if v is not None}}
    return cfg


def dtype_bytes(cfg: dict, dtype: str | None = None) -> int:
    name = str(dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return DTYPE_BYTES.get(name, 2)


def kv_bytes_per_token(cfg: dict, dtype: str | None = None) -> int:
    """KV bytes one token costs over every layer, as if all were full attention."""
    t = text_config(cfg)
    return int(_layers(t)) * _per_layer_token(cfg, dtype)


def _layers(t: dict) -> int:
    return int(t.get("num_hidden_layers") or t.get("n_layers") or t.get("num_layers"))


def _per_layer_token(cfg: dict, dtype: str | None = None) -> int:
    t = text_config(cfg)
    heads = t.get("num_attention_heads") or t.get("n_heads")
    kv_heads = t.get("num_key_value_heads") or t.get("n_kv_heads") or heads
    head_dim = t.get("head_dim") or (t.get("hidden_size") or t["d_model"]) // heads
    return int(kv_heads) * int(head_dim) * 2 * dtype_bytes(cfg, dtype)


# What a layer of each attention kind keeps, from the config's `layer_types`: every token, a window
# of them, or (linear attention) a state whose size does not grow with the prompt.
FULL, LINEAR = None, 0


def layer_spans(cfg: dict) -> list:
    """Per layer, the tokens it attends to: FULL, a window, or LINEAR (a fixed state), as the config's
    `layer_types` say; for families whose configs say it (the default does not read them)."""
    t = text_config(cfg)
    kinds = t.get("layer_types") or ["full_attention"] * _layers(t)
    span = {"sliding_attention": t.get("sliding_window"), "chunked_attention": t.get("attention_chunk_size"),
            "linear_attention": LINEAR}
    return [span.get(kind, FULL) for kind in kinds]


def kv_bytes(cfg: dict, tokens: int, spans: list | None = None, state_bytes: int = 0,
             dtype: str | None = None) -> int:
    """KV bytes of a sequence of `tokens`: a full layer keeps them all (`spans` None: every layer
    full), a layer attending to a window of W (sliding or chunked) the last W - 1 between steps, as
    transformers' DynamicSlidingWindowLayer does, and each linear layer `state_bytes` of its own."""
    spans = [FULL] * _layers(text_config(cfg)) if spans is None else spans
    kept = sum(tokens if s is FULL else min(tokens, s - 1) for s in spans if s is not LINEAR)
    return kept * _per_layer_token(cfg, dtype) + state_bytes * sum(1 for s in spans if s is LINEAR)


def gated_delta_state_bytes(cfg: dict) -> int:
    """What one linear-attention (gated delta net) layer keeps, whatever the length: its causal-conv
    window over the q, k and v projections (model dtype) and its recurrent state per value head (float32
    whatever the model's dtype: transformers' gated delta rule computes it in float32 and keeps it so)."""
    t = text_config(cfg)
    keys, values = t["linear_num_key_heads"] * t["linear_key_head_dim"], t["linear_num_value_heads"] * t["linear_value_head_dim"]
    conv = (2 * keys + values) * t.get("linear_conv_kernel_dim", 4)
    recurrent = t["linear_num_value_heads"] * t["linear_key_head_dim"] * t["linear_value_head_dim"]
    return conv * dtype_bytes(cfg) + recurrent * 4


def default_image_tokens(card, width: int, height: int) -> int:
    """Patches after merging, for ViT-style encoders; a plugin knows its processor better."""
    vision = model_config(card).get("vision_config") or {}
    patch = vision.get("patch_size") or 14
    merge = vision.get("spatial_merge_size") or 1
    return max(1, math.ceil(width / patch) * math.ceil(height / patch) // (merge * merge))


def approx_text_tokens(prompt: str) -> int:
    """Without a tokenizer at hand: special tokens, words and punctuation, a slight overestimate for
    English BPE."""
    return len(re.findall(r"<\|?[\w/]+\|?>|\w+|[^\w\s]", prompt))


def prompt_tokens(card, request, image_tokens=None) -> int:
    """The prompt's tokens, images included (`image_tokens(card, w, h)`: the family's count),
    without loading a tokenizer."""
    count = image_tokens or default_image_tokens
    return approx_text_tokens(request.prompt) + sum(count(card, im.width, im.height) for im in request.images)


def request_tokens(card, request, image_tokens=None) -> int:
    """Tokens a request holds at its longest: its prompt (images included) plus all new tokens."""
    return prompt_tokens(card, request, image_tokens) + request.max_new_tokens


def estimate_kv(card, request, image_tokens=None, spans: list | None = None, state_bytes: int = 0) -> int:
    """A family's estimate from its facts: how it counts image tokens, what its layers keep."""
    return kv_bytes(model_config(card), request_tokens(card, request, image_tokens), spans, state_bytes)


def activation_bytes_per_token(cfg: dict, dtype: str | None = None) -> int:
    """Transient per-token memory of one layer's forward pass (residual, attention and MLP)."""
    t = text_config(cfg)
    hidden = int(t.get("hidden_size") or 0)
    inter = int(t.get("intermediate_size") or 4 * hidden)
    return (2 * hidden + 2 * inter) * dtype_bytes(cfg, dtype)


def batch_bytes(card, request, kv: int) -> int:
    """What a request costs a transformers batch: its KV (the family's estimate) and its activations."""
    tokens = (request.prompt_tokens or approx_text_tokens(request.prompt)) + request.max_new_tokens
    return kv + tokens * activation_bytes_per_token(model_config(card))


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
