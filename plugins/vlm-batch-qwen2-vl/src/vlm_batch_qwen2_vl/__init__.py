"""Qwen2-VL for vlm-batch: names, prompt format, image sizing, engine arguments, and a tiny checkpoint.

Images are sized with qwen-vl-utils' `fetch_image`, the call VLMEvalKit's Qwen2VLChat makes, so
the engine sees the same pixels VLMEvalKit would give it.
"""

from __future__ import annotations

import math
from pathlib import Path

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts

FAMILY = "qwen2-vl"
SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
END = "<|im_end|>"
MAX_IMAGES = 24                       # VLMEvalKit's VLLM_MAX_IMAGE_INPUT_NUM for Qwen2-VL
VLMEVAL_PIXELS = {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}
OCRBENCH_MIN_PIXELS = 10 * 10 * 28 * 28   # VLMEvalKit's per-dataset override

TINY_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}   # the embedded model's image bounds


TRAINED = Path(__file__).with_name("tiny")   # written by `python -m vlm_batch_qwen2_vl.train --out ...`


def tiny_checkpoint() -> str:
    """The trained tiny model shipped in this package (see train.py for how it was made)."""
    if not (TRAINED / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model is missing from {TRAINED}; reinstall vlm-batch-qwen2-vl "
                                "or rebuild it with `python -m vlm_batch_qwen2_vl.train --out` that folder")
    return str(TRAINED)


def _card(name, checkpoint, **kw):
    return ModelCard(name=name, family=FAMILY, checkpoint=checkpoint,
                     prompt_attrs={"_use_custom_prompt": True}, **kw)


@hookimpl
def vlm_batch_models():
    real = dict(max_new_tokens=2048, options=VLMEVAL_PIXELS,
                vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MAX_IMAGES}})
    return [
        _card("Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-2B-Instruct", **real),
        _card("Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", **real),
        _card("Qwen2-VL-72B-Instruct", "Qwen/Qwen2-VL-72B-Instruct",
              **{**real, "vllm_args": {**real["vllm_args"], "tensor_parallel_size": 4}}),
        # Images as VLMEvalKit's Qwen2VLChat passes them on this checkpoint: up to 24 a prompt. At
        # most 16 tokens each within TINY_PIXELS, 24 fit the 2048-token context; a prompt that does
        # not fit fails alone, with vLLM's cause (VLMEvalKit's run would stop on it).
        _card("tiny-qwen2-vl", tiny_checkpoint, vlmeval_name="Qwen2-VL-2B-Instruct", demo=True,
              max_new_tokens=16, options=TINY_PIXELS,
              vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": MAX_IMAGES}},
              description="a 1.3M-parameter Qwen2-VL trained to read the sample set's shapes and colours"),
    ]


def _pixels(card, dataset):
    pixels = {k: v for k, v in card.options.items() if k in ("min_pixels", "max_pixels")}
    if dataset == "OCRBench":
        pixels["min_pixels"] = OCRBENCH_MIN_PIXELS
    return pixels


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    from qwen_vl_utils import fetch_image

    limit = card.vllm_args.get("limit_mm_per_prompt", {}).get("image", MAX_IMAGES)
    pixels = _pixels(card, dataset)
    content, images = parts(message, limit, lambda part: fetch_image({"image": part["image"], **pixels}))
    text = "".join(IMAGE if kind == "image" else value for kind, value in content)
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv

    return estimate_kv(card, request, image_tokens)   # every layer full attention


def image_tokens(card, width, height) -> int:
    """Dynamic resolution: the image resized to whole 28-px cells within the pixel bounds, a token each."""
    from qwen_vl_utils import smart_resize

    pixels = card.options
    h, w = smart_resize(height, width, factor=28, min_pixels=pixels.get("min_pixels"),
                        max_pixels=pixels.get("max_pixels"))
    return math.ceil(h / 28) * math.ceil(w / 28)


def last_boxed(text: str) -> str:
    """VLMEvalKit's `post_process` for Qwen2-VL: what the last \\boxed{...} holds, braces balanced
    (to the end of the text when unclosed); a text with no \\boxed{ is kept whole."""
    tail = text.split("\\boxed{")[-1]
    depth = 1
    for i, char in enumerate(tail):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return tail[:i]
    return tail


@hookimpl
def vlm_batch_generate(card, engine, requests):
    # <|im_end|> ends the assistant's turn (the checkpoint says so too); `post_process` is VLMEvalKit's
    # opt-in extraction of a \\boxed{} answer (off by default there, and here).
    clean = (lambda request, text: last_boxed(text)) if card.options.get("post_process") else None
    return generate(engine, requests, stop_tokens=(END,), clean=clean)
