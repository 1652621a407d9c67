"""Molmo for vlm-batch: names, prompt format, image limit, engine arguments, image tokens, post-processing.

As VLMEvalKit's `molmo`: the message's texts joined by newlines, its first image (BLINK: all side by
side), the "role" format, up to 36 crops, 200 new tokens, the answer stripped, and on AI2D a bare option
text mapped to its letter. vLLM's Molmo processor re-tokenizes "User: {prompt} Assistant:" with the
leading space and BOS and puts the image tokens after the BOS itself, so the text has no placeholder.
On transformers: the checkpoint's own `process` and `generate_from_batch` (remote code, opt-in).
"""

from __future__ import annotations

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate

FAMILY = "molmo"
MAX_CROPS = 36            # VLMEvalKit's default max_crops
MAX_NEW_TOKENS = 200      # VLMEvalKit's GenerationConfig(max_new_tokens=200, stop_strings="<|endoftext|>")
STOP = "<|endoftext|>"
HF_CLASS = "AutoModelForCausalLM"   # the checkpoint's own class, through its auto_map
AI2D = ("AI2D_TEST", "AI2D_TEST_NO_MASK")
# Molmo's image processor: 336-px crops of 14-px patches, 4-patch overlap margins, 2x2 pooling.
CROP, PATCH, MARGIN, POOL, BASE_TOKENS = 336, 14, 4, 2, 12


def role_prompt(text: str) -> str:
    """Molmo's "role" message format, less the leading space its processors add."""
    return f"User: {text} Assistant:"


def letter_for(prompt_text: str, answer: str) -> str:
    """VLMEvalKit's AI2D mapping: an answer equal to an option line becomes that option's letter."""
    options = prompt_text.split("\n")[1:]
    return chr(ord("A") + options.index(answer)) if answer in options else answer


def _card(name, path, **kw):
    return ModelCard(name=name, family=FAMILY, checkpoint=path, trust_remote_code=True, hf_class=HF_CLASS,
                     max_new_tokens=MAX_NEW_TOKENS, options={"max_crops": MAX_CROPS}, **kw)


@hookimpl
def vlm_batch_models():
    vllm = {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}}
    return [
        _card("molmoE-1B-0924", "allenai/MolmoE-1B-0924", vllm_args=vllm),
        _card("molmo-7B-D-0924", "allenai/Molmo-7B-D-0924", vllm_args=vllm),
        _card("molmo-7B-O-0924", "allenai/Molmo-7B-O-0924", vllm_args=vllm),
        _card("molmo-72B-0924", "allenai/Molmo-72B-0924", vllm_args={**vllm, "tensor_parallel_size": 4}),
    ]


def _picture(message, dataset):
    """The first image; on BLINK, as VLMEvalKit, all of them side by side, 512 px high."""
    parts = [p for p in message if p["type"] == "image"]
    if dataset == "BLINK" and len(parts) > 1:
        from vlm_batch.images import open_rgb
        from vlm_batch.vlmeval.prompts import side_by_side

        return [open_rgb(side_by_side([p["value"] for p in parts], height=512))]
    return [p["image"] for p in parts[:1]]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    text = "\n".join(p["value"] for p in message if p["type"] == "text")
    return Request(prompt=role_prompt(text), images=_picture(message, dataset),
                   max_new_tokens=card.max_new_tokens, mm_kwargs={"max_crops": card.options["max_crops"]})


def clean(request, text: str) -> str:
    """VLMEvalKit's: the answer stripped; on AI2D without letters, an option's text becomes its letter."""
    text = text.strip()
    raw = request.prompt[len("User: "):-len(" Assistant:")]
    if request.dataset in AI2D and "ai2_diagram_no_letter" in raw:
        text = letter_for(raw, text)
    return text


@hookimpl
def vlm_batch_generate(card, engine, requests):
    return generate(engine, requests, stop_tokens=(STOP,), hf_batch=_hf_batch, clean=clean)


def _hf_batch(engine, requests):
    """One batch through the checkpoint's `process` and `generate_from_batch`, padded as Molmo pads (-1).
    Every item has the keys of the first: the core batches requests of one image count together."""
    import torch
    from transformers import GenerationConfig

    items = [engine.processor.process(text=r.prompt, images=r.images or None,
                                      images_kwargs={"max_crops": r.mm_kwargs.get("max_crops", MAX_CROPS)},
                                      text_kwargs={"message_format": "none", "always_start_with_space": True})
             for r in requests]
    batch = {key: torch.full((len(items), *map(max, zip(*(i[key].shape for i in items)))), -1,
                             dtype=items[0][key].dtype, device=engine.device) for key in items[0]}
    for row, item in enumerate(items):
        for key, t in item.items():
            batch[key][(row, *(slice(0, n) for n in t.shape))] = t
    config = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in requests), stop_strings=STOP,
                              **engine.card.generation)
    with torch.inference_mode():
        output = engine.model.generate_from_batch(batch, config, tokenizer=engine.processor.tokenizer)
    width = batch["input_ids"].shape[1]
    return [engine.finish(request, row, len(item["input_ids"]))
            for request, item, row in zip(requests, items, output[:, width:].tolist())]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv

    return estimate_kv(card, request, image_tokens)   # every layer full attention; images by their crops


def image_tokens(card, width, height) -> int:
    """As Molmo's processor and vLLM count them: a global 12x12 view, then the crops' pooled patches, each
    row ending in a column token. The crop grid is Molmo's `select_tiling` (of the grids of 224-px windows,
    the one that enlarges the image least, else shrinks it least), in float32 as vLLM ties it."""
    import numpy as np

    n, window, margins = card.options["max_crops"], (CROP // PATCH - 2 * MARGIN) * PATCH, 2 * MARGIN * PATCH
    grids = np.array(sorted(((r, c) for r in range(1, n + 1) for c in range(1, n + 1) if r * c <= n),
                            key=lambda g: g[0] * g[1]), dtype=np.int32)
    with np.errstate(divide="ignore"):     # an image of 112 px: a zero size, as vLLM divides by it too
        scale = ((grids * window).astype(np.float32)
                 / np.array([height - margins, width - margins], np.float32)).min(-1)
    pick = scale.argmax() if (scale < 1).all() else np.where(scale < 1, 1e10, scale).argmin()
    rows, cols = (int(x) for x in grids[pick])
    inner, edge = window // PATCH // POOL, margins // PATCH // POOL      # pooled: 8 a crop, 4 the margins
    return 2 + (BASE_TOKENS + 1) * BASE_TOKENS + 2 + (cols * inner + edge + 1) * (rows * inner + edge)
