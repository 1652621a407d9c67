"""Llama 4 for vlm-batch: names, prompt format, image limit, engine arguments, post-processing, memory.

VLMEvalKit runs `Llama-4-Scout-17B-16E-Instruct` through vLLM (`use_vllm=True` in its config): one
user turn, no system prompt, at most 10 images, 4096 new tokens, a trailing `<|eot|>` cut from the
answer. Both our engines follow that path; its temperature of 0.01 becomes greedy decoding here.
As with every Llama tokenizer, `<|begin_of_text|>` is added by the tokenizer, so the prompt text
starts after it (a second one in the text would give the model two).
"""

from __future__ import annotations

import math

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts

FAMILY = "llama4"
MAX_IMAGES = 10          # VLMEvalKit: "vLLM support max 10 images per prompt for Llama 4"
MAX_NEW_TOKENS = 4096    # VLMEvalKit's llama4 default on its vLLM path
IMAGE = "<|image|>"      # the processor expands it into tiles of patch tokens
EOT = "<|eot|>"
STOPS = ("<|eot|>", "<|eom|>")   # end of turn, end of message (a tool call): the answer ends at either
# Real checkpoints: 336-px tiles of 14-px patches, pixel shuffle 0.5 -> 144 tokens a tile, <= 16 tiles.
REAL_IMAGES = {"tile": 336, "patch": 14, "shuffle": 0.5, "max_tiles": 16}


def render(content: list[tuple[str, str]]) -> str:
    """The chat text after `<|begin_of_text|>`: one user turn of (kind, text) parts, then the assistant's."""
    body = "".join(IMAGE if kind == "image" else text for kind, text in content)
    return f"<|header_start|>user<|header_end|>\n\n{body}{EOT}<|header_start|>assistant<|header_end|>\n\n"


def strip_eot(text: str | None) -> str | None:
    """VLMEvalKit's post-processing: a trailing `<|eot|>` is not part of the answer."""
    return text[:-len(EOT)] if text is not None and text.endswith(EOT) else text


@hookimpl
def vlm_batch_models():
    return [
        ModelCard(name="Llama-4-Scout-17B-16E-Instruct", family=FAMILY,
                  checkpoint="meta-llama/Llama-4-Scout-17B-16E-Instruct", max_new_tokens=MAX_NEW_TOKENS,
                  hf_class="Llama4ForConditionalGeneration", options={"max_images": MAX_IMAGES, **REAL_IMAGES},
                  vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MAX_IMAGES}}),
    ]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    content, images = parts(message, card.options["max_images"])
    return Request(prompt=render(content), images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    return generate(engine, requests, stop_tokens=STOPS, clean=lambda request, text: strip_eot(text))


def spans(cfg: dict) -> list:
    """Layers with RoPE attend within chunks (8192 tokens in Llama 4); every 4th layer, without RoPE,
    attends to all (`no_rope_layers`: 1 where a layer has RoPE)."""
    from vlm_batch.memory import FULL, layer_spans, text_config

    t = text_config(cfg)
    if t.get("layer_types"):
        return layer_spans(cfg)
    n, every = int(t["num_hidden_layers"]), int(t.get("no_rope_layer_interval") or 4)
    rope = t.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
    chunk = int(t.get("attention_chunk_size") or 8192)
    return [chunk if r else FULL for r in rope]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv, model_config

    return estimate_kv(card, request, image_tokens, spans(model_config(card)))


def image_tokens(card, width, height) -> int:
    o = card.options
    per_tile = (o["tile"] // o["patch"]) ** 2 * o["shuffle"] ** 2
    # Tiles cover the image (at most max_tiles); several tiles get a separator each and a global view
    # after <|image|>; <|image_start|>, <|image|> and <|image_end|> frame it all.
    tiles = min(math.ceil(width / o["tile"]) * math.ceil(height / o["tile"]), o["max_tiles"])
    return int((tiles * (per_tile + 1) if tiles > 1 else 0) + per_tile + 3)
