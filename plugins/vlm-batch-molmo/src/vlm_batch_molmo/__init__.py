"""Molmo for vlm-batch: names, prompt format, image limit, engine arguments, image tokens, post-processing.

VLMEvalKit runs Molmo only through transformers, one item at a time: the message's texts joined by
newlines, its first image (BLINK: all images side by side), Molmo's processor in its "role" format
(" User: {prompt} Assistant:"), up to 36 crops, 200 new tokens, the answer stripped, and on AI2D a
bare option text mapped back to its letter. We keep all of that on both engines:

- vLLM (`MolmoForCausalLM`): the prompt text is "User: {prompt} Assistant:"; vLLM's Molmo processor
  re-tokenizes it with the leading space and the BOS token and inserts the image tokens after the
  BOS itself, so the text carries no image placeholder (vLLM's own example puts a literal `<image>`
  and a ChatML wrapper in the text; to Molmo both are plain words, so we send what Molmo's own
  processor, and so VLMEvalKit, gives it instead).
- transformers: the checkpoint's own processor (`process`) and `generate_from_batch`, batched by the
  core's collector; the model class ships with the checkpoint, so nothing runs without
  `--trust-remote-code`.
"""

from __future__ import annotations

import math

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate

FAMILY = "molmo"
MAX_CROPS = 36            # VLMEvalKit's default max_crops
MAX_NEW_TOKENS = 200      # VLMEvalKit's GenerationConfig(max_new_tokens=200, stop_strings="<|endoftext|>")
STOP = "<|endoftext|>"
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
    return ModelCard(name=name, family=FAMILY, checkpoint=path, trust_remote_code=True,
                     hf_class="AutoModelForCausalLM", max_new_tokens=MAX_NEW_TOKENS,
                     options={"max_crops": MAX_CROPS}, **kw)


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
    from vlm_batch.images import open_rgb

    parts = [p for p in message if p["type"] == "image"]
    if not parts:
        return []
    if dataset == "BLINK" and len(parts) > 1:   # as VLMEvalKit: the images side by side, 512 px high
        from vlm_batch.vlmeval.prompts import side_by_side

        return [open_rgb(side_by_side([p["value"] for p in parts], height=512))]
    return [parts[0]["image"]]


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
    # On transformers the checkpoint's own processor and generate_from_batch (stopping at STOP).
    return generate(engine, requests, stop_tokens=(STOP,), hf_batch=_hf_batch, clean=clean)


def _hf_batch(engine, requests):
    """One batch through the checkpoint's `process` and `generate_from_batch`, padded as Molmo pads (-1)."""
    import torch
    from transformers import GenerationConfig

    items = [engine.processor.process(text=r.prompt, images=r.images or None,
                                      images_kwargs={"max_crops": r.mm_kwargs.get("max_crops", MAX_CROPS)},
                                      text_kwargs={"message_format": "none", "always_start_with_space": True})
             for r in requests]
    batch = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        size = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        out = torch.full((len(tensors), *size), -1, dtype=tensors[0].dtype)
        for i, t in enumerate(tensors):
            out[(i, *(slice(0, s) for s in t.shape))] = t
        batch[key] = out.to(engine.device)
    budget = max(r.max_new_tokens for r in requests)
    with torch.inference_mode():
        output = engine.model.generate_from_batch(
            batch, GenerationConfig(max_new_tokens=budget, stop_strings=STOP),
            tokenizer=engine.processor.tokenizer)
    width = batch["input_ids"].shape[1]
    return [engine.finish(request, row, len(item["input_ids"]))
            for request, item, row in zip(requests, items, output[:, width:].tolist())]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv

    return estimate_kv(card, request, image_tokens)   # every layer full attention; images by their crops


def image_tokens(card, width, height) -> int:
    # As Molmo's processor (and vLLM's count of it): a global 12x12 view with column markers, plus
    # the crops' pooled patches; crops tile the image in 224-px windows, at most max_crops of them.
    inner = CROP // PATCH - 2 * MARGIN                      # patches a crop adds beyond its margins
    cols = math.ceil(max(width - 2 * MARGIN * PATCH, 1) / (inner * PATCH))
    rows = math.ceil(max(height - 2 * MARGIN * PATCH, 1) / (inner * PATCH))
    while cols * rows > card.options["max_crops"]:
        cols, rows = (cols - 1, rows) if cols >= rows else (cols, rows - 1)
    ncols, nrows = cols * inner + 2 * MARGIN, rows * inner + 2 * MARGIN
    return 2 + (BASE_TOKENS + 1) * BASE_TOKENS + 2 + ((ncols + 1) // POOL + 1) * ((nrows + 1) // POOL)
