"""Qwen3-VL and Qwen3.5 for vlm-batch: VLMEvalKit's `Qwen3VLChat` names (dense and MoE, Instruct and
Thinking), its prompts, image sizing and arguments as that class applies them.

- Prompts: the checkpoint's own chat template (its processor's `apply_chat_template`), as Qwen3VLChat
  renders it, so Instruct, Thinking (the prompt ends in `<think>\\n`), Qwen3.5 (thinks by default,
  contents trimmed) and a fine-tune each get theirs; a system turn only with `system_prompt`.
- Images: qwen-vl-utils' `fetch_image` with 16-px patches (32-px cells) within the entry's min/max
  pixels (OCRBench: at least 102,400). Then the class's two paths differ, and the entry's says which
  applies: its vLLM path (`use_vllm`, most entries) lets the processor resize again to the
  checkpoint's own bounds, as both our engines do by default; its transformers path passes
  `do_resize=False`, which our request carries to either engine.
- Generation: its vLLM path samples (temperature, top_p, top_k, repetition and presence penalties of
  the entry; Instruct 0.7, Thinking and Qwen3.5 1.0), and so do our engines for these cards, seeded per
  request; its transformers path passes temperature, top_p, top_k and the repetition penalty with the
  checkpoint's do_sample (true in Qwen's releases). A config's `"generation": {"temperature": 0}` is greedy.
- Thinking: the whole answer is the prediction, reasoning and `</think>` included, as VLMEvalKit keeps
  it; with SPLIT_THINK set, both split it after the last `</think>` into `prediction` and `thinking`.
- Memory: full-attention layers keep KV; Qwen3.5's Gated DeltaNet layers a fixed state each.
  vLLM-CPU runs Gated DeltaNet only in bfloat16 (its kernel asserts it), so Qwen3.5 runs so there.
"""

from __future__ import annotations

import functools
import math
import re

from vlm_batch import ModelCard, Request, Unserved, hookimpl
from vlm_batch.generation import generate, last_boxed, parts
from vlm_batch.served import tensor_parallel

FAMILY = "qwen3-vl"
VLMEVAL_CLASSES = ("Qwen3VLChat",)
ARCHITECTURES = {arch: "Qwen3VLChat" for arch in (
    "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")}
END = "<|im_end|>"
PATCH, FACTOR = 16, 32                 # 16-px patches merged 2 x 2: a token per 32-px cell
MAX_IMAGES = 24                        # VLMEvalKit's limit_mm_per_prompt for Qwen3VLChat's vLLM
OCRBENCH_MIN_PIXELS = 10 * 10 * 32 * 32
DEFAULTS = {"max_new_tokens": 32768, "top_p": 0.8, "top_k": 20, "temperature": 0.01,
            "repetition_penalty": 1.0, "presence_penalty": 1.5, "use_custom_prompt": True}   # Qwen3VLChat's own
OMNI = ("a Qwen3-Omni (thinker-talker, audio) model: VLMEvalKit runs it with qwen-omni-utils, an audio front "
        "end and vLLM's V0 engine (VLLM_USE_V1=0, gone from vLLM 0.32); this plugin builds no Omni prompts")
CAPTIONER = "an audio captioner (it takes audio only, so no image benchmark applies)"


def generation(args: dict) -> dict:
    """The sampling VLMEvalKit's path for this entry applies (see the module's docstring)."""
    got = {**DEFAULTS, **args}
    keys = ["temperature", "top_p", "top_k", "repetition_penalty"]
    if got.get("use_vllm"):
        return {k: got[k] for k in keys + ["presence_penalty"]}
    return {**{k: got[k] for k in keys}, "do_sample": True}


@hookimpl
def vlm_batch_vlmeval_card(entry):
    path, args = str(entry.model_path), entry.args
    if "captioner" in path.lower():
        return Unserved(entry.name, CAPTIONER)
    if "omni" in (path + entry.architecture).lower():   # Qwen3VLChat's own test, on the path
        return Unserved(entry.name, OMNI)
    if entry.architecture and entry.architecture not in ARCHITECTURES:
        return Unserved(entry.name, f"its checkpoint is a {entry.architecture}, not a Qwen3-VL or Qwen3.5")
    qwen35 = "qwen3_5" in entry.architecture.lower() or "qwen3.5" in path.lower()
    moe = "moe" in entry.architecture.lower() or bool(re.search(r"-A\d+B", path))
    vllm_args = {"limit_mm_per_prompt": {"image": MAX_IMAGES}, **tensor_parallel(entry.name)}
    if moe:
        vllm_args["enable_expert_parallel"] = True   # VLMEvalKit's, for names with an active size (-A3B)
    notes = [] if args.get("use_vllm") else ["VLMEvalKit's reference is its transformers path"]
    return ModelCard(
        name=entry.name, family=FAMILY, checkpoint=path, vlmeval_class=entry.cls,
        prompt_attrs={"_use_custom_prompt": args.get("use_custom_prompt", DEFAULTS["use_custom_prompt"])},
        max_new_tokens=int(args.get("max_new_tokens", DEFAULTS["max_new_tokens"])), options=args,
        vllm_args=vllm_args, vllm_cpu_args={"dtype": "bfloat16"} if qwen35 else {},
        generation=generation(args), description="; ".join(notes))


@functools.lru_cache(maxsize=8)
def processor(path: str):
    """The checkpoint's processor: its chat template, and its image bounds for the memory estimate."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def pixels(card, dataset) -> dict:
    """What Qwen3VLChat adds to each image part: its min/max pixels, OCRBench's minimum."""
    bounds = {k: card.options[k] for k in ("min_pixels", "max_pixels") if card.options.get(k) is not None}
    if dataset == "OCRBench":
        bounds["min_pixels"] = OCRBENCH_MIN_PIXELS
    return bounds


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    from qwen_vl_utils import fetch_image

    limit = card.vllm_args.get("limit_mm_per_prompt", {}).get("image", MAX_IMAGES)
    bounds = pixels(card, dataset)
    content, images = parts(message, limit,
                            lambda part: fetch_image({"image": part["image"], **bounds}, image_patch_size=PATCH))
    turns = [{"role": "system", "content": card.options["system_prompt"]}] if card.options.get("system_prompt") else []
    turns.append({"role": "user", "content": [{"type": "image"} if kind == "image" else {"type": "text", "text": text}
                                              for kind, text in content]})
    prompt = processor(card.path()).apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    resize = {} if card.options.get("use_vllm") else {"do_resize": False}   # the transformers path's
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens, mm_kwargs=resize)


def image_tokens(card, width, height) -> int:
    """A token per 32-px cell of the image as the processor sizes it: within the checkpoint's own bounds
    (its `size`), unless the card's path keeps the image as prepared."""
    from qwen_vl_utils import smart_resize

    if card.options.get("use_vllm"):
        size = processor(card.path()).image_processor.size
        height, width = smart_resize(height, width, factor=FACTOR, min_pixels=size["shortest_edge"],
                                     max_pixels=size["longest_edge"])
    return math.ceil(height / FACTOR) * math.ceil(width / FACTOR)


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import LINEAR, estimate_kv, gated_delta_state_bytes, layer_spans, model_config

    spans = layer_spans(model_config(card))   # Qwen3.5: linear-attention layers keep a fixed state
    state = gated_delta_state_bytes(model_config(card)) if LINEAR in spans else 0
    return estimate_kv(card, request, image_tokens, spans, state)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    # <|im_end|> ends the assistant's turn; `post_process` is VLMEvalKit's opt-in \\boxed{} extraction.
    clean = (lambda request, text: last_boxed(text)) if card.options.get("post_process") else None
    return generate(engine, requests, stop_tokens=(END,), clean=clean)
