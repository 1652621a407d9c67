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

# The chat template Qwen2-VL-Instruct checkpoints ship (a default system turn when none is given).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" + IMAGE +
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TINY_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def build_tiny(path, init_std: float = 0.02, text: dict | None = None, vision: dict | None = None) -> None:
    """The tiny Qwen2-VL architecture (1.3M parameters) with random weights: where training starts."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(dict(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], initializer_range=init_std), **(text or {})),
        vision_config=dict(dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=4,
                                initializer_range=init_std), **(vision or {})),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**TINY_PIXELS), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)


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
        _card("tiny-qwen2-vl", tiny_checkpoint, vlmeval_name="Qwen2-VL-2B-Instruct", demo=True,
              max_new_tokens=16, options=TINY_PIXELS,
              vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}},
              description="a 1.3M-parameter Qwen2-VL trained to read the sample set's shapes and colours"),
    ]


def _pixels(card, dataset):
    pixels = {k: v for k, v in card.options.items() if k in ("min_pixels", "max_pixels")}
    if dataset == "OCRBench":
        pixels["min_pixels"] = OCRBENCH_MIN_PIXELS
    return pixels


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    if card.family != FAMILY:
        return None
    from qwen_vl_utils import fetch_image

    limit = card.vllm_args.get("limit_mm_per_prompt", {}).get("image", MAX_IMAGES)
    pixels = _pixels(card, dataset)
    content, images = parts(message, limit, lambda part: fetch_image({"image": part["image"], **pixels}))
    text = "".join(IMAGE if kind == "image" else value for kind, value in content)
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_estimate_memory(card, request):
    if card.family != FAMILY:
        return None
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
    if card.family != FAMILY:
        return None
    # <|im_end|> ends the assistant's turn (the checkpoint says so too); `post_process` is VLMEvalKit's
    # opt-in extraction of a \\boxed{} answer (off by default there, and here).
    clean = (lambda request, text: last_boxed(text)) if card.options.get("post_process") else None
    return generate(engine, requests, stop_tokens=(END,), clean=clean)
