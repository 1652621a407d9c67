"""Qwen2-VL and Qwen2.5-VL for vlm-batch: VLMEvalKit's `Qwen2VLChat` names, its prompt format, image
sizing and arguments, engine arguments, and the embedded tiny checkpoint.

Every `supported_VLM` entry of Qwen2VLChat becomes a card (the core reads the registry), its
arguments applied as Qwen2VLChat applies them: min/max_pixels size images with qwen-vl-utils'
`fetch_image` (OCRBench raises the minimum); `system_prompt` replaces the template's default system
turn; `use_custom_prompt` picks the class's own prompts; `max_new_tokens`; `post_process` keeps the last
\\boxed{}; its vLLM path is greedy, and so are its transformers path's defaults (top_k 1).

Qwen2.5-VL is the same to us: the same chat template and 14-px patches merged 2 x 2 (a token per 28-px
cell, two markers per image), and a Qwen2 language model (same KV). Its vision encoder differs
(windowed attention over 112-px windows with 4 of its 32 blocks full, RMSNorm, SwiGLU), which
changes the encoder's own working memory, not its image tokens or the KV cache.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from vlm_batch import ModelCard, Request, Unserved, hookimpl
from vlm_batch.generation import generate, last_boxed, parts
from vlm_batch.served import tensor_parallel

FAMILY = "qwen2-vl"
VLMEVAL_CLASSES = ("Qwen2VLChat",)
ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "Qwen2VLChat",
                 "Qwen2_5_VLForConditionalGeneration": "Qwen2VLChat"}
SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
END = "<|im_end|>"
MAX_IMAGES = 24                       # VLMEvalKit's VLLM_MAX_IMAGE_INPUT_NUM for Qwen2-VL
VLMEVAL_PIXELS = {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}
OCRBENCH_MIN_PIXELS = 10 * 10 * 28 * 28   # VLMEvalKit's per-dataset override
DEFAULTS = {"max_new_tokens": 2048, "use_custom_prompt": True, "do_sample": True, "top_k": 1, "top_p": 0.001,
            "temperature": 0.01, "repetition_penalty": 1.0}   # Qwen2VLChat's own
OMNI = ("a Qwen2.5-Omni (thinker-talker, audio) model: VLMEvalKit runs it with qwen-omni-utils and an Omni "
        "processor; vLLM 0.32 has only its thinker, and this plugin builds no Omni prompts")
TINY_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}   # the embedded model's image bounds


TRAINED = Path(__file__).with_name("tiny")   # written by `python -m vlm_batch_qwen2_vl.train --out ...`


def tiny_checkpoint() -> str:
    """The trained tiny model shipped in this package (see train.py for how it was made)."""
    if not (TRAINED / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model is missing from {TRAINED}; reinstall vlm-batch-qwen2-vl "
                                "or rebuild it with `python -m vlm_batch_testing.train_qwen2_vl --out` that folder")
    return str(TRAINED)


def _card(name, checkpoint, **kw):
    return ModelCard(name=name, family=FAMILY, checkpoint=checkpoint,
                     prompt_attrs={"_use_custom_prompt": True}, **kw)


@hookimpl
def vlm_batch_models():
    return [
        # Images as VLMEvalKit's Qwen2VLChat passes them on this checkpoint: up to 24 a prompt. At
        # most 16 tokens each within TINY_PIXELS, 24 fit the 2048-token context; a prompt that does
        # not fit fails alone, with vLLM's cause (VLMEvalKit's run would stop on it).
        _card("tiny-qwen2-vl", tiny_checkpoint, vlmeval_name="Qwen2-VL-2B-Instruct", demo=True,
              max_new_tokens=16, options=TINY_PIXELS,
              vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": MAX_IMAGES}},
              description="a 1.3M-parameter Qwen2-VL trained to read the sample set's shapes and colours"),
    ]


def quantized(path: str) -> tuple[tuple, str, str]:
    """(engines, why it needs a GPU or "", a note) for a quantized build, from its name as Qwen names them."""
    if re.search(r"gptq-int8", path, re.I):
        return ("vllm",), ("8-bit GPTQ weights: vLLM-CPU's quantized kernel takes 4-bit weights only, and "
                           "transformers needs gptqmodel and optimum"), "8-bit GPTQ: vLLM on a GPU only"
    if re.search(r"-awq|gptq-int4", path, re.I):
        return ("vllm",), "", "4-bit: vLLM only (on CPU in bfloat16, its WNA16 kernel; not tried here)"
    return ("vllm", "hf"), "", ""


def sampling(args: dict) -> dict:
    """Qwen2VLChat samples only on its transformers path, only with do_sample and top_k above 1."""
    got = {**DEFAULTS, **args}
    if not got["do_sample"] or got["top_k"] == 1 or not got["temperature"]:
        return {}
    return {k: got[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}


@hookimpl
def vlm_batch_vlmeval_card(entry):
    path, args = str(entry.model_path), entry.args
    if "omni" in (path + entry.architecture).lower():   # Qwen2VLChat's own test, on config.json's architectures
        return Unserved(entry.name, OMNI)
    if entry.architecture and entry.architecture not in ARCHITECTURES:
        return Unserved(entry.name, f"its checkpoint is a {entry.architecture}, which Qwen2VLChat cannot load")
    engines, gpu_only, note = quantized(path)
    notes = [note] if note else []
    if args.get("use_lmdeploy"):
        notes.append("VLMEvalKit's reference runs it on lmdeploy")
    return ModelCard(
        name=entry.name, family=FAMILY, checkpoint=path, engines=engines, gpu_only=gpu_only,
        prompt_attrs={"_use_custom_prompt": args.get("use_custom_prompt", DEFAULTS["use_custom_prompt"])},
        max_new_tokens=int(args.get("max_new_tokens", DEFAULTS["max_new_tokens"])), options=args,
        vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MAX_IMAGES}, **tensor_parallel(entry.name)},
        vllm_cpu_args={"dtype": "bfloat16"} if engines == ("vllm",) else {}, generation=sampling(args),
        description="; ".join(notes))


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
    system = card.options.get("system_prompt") or SYSTEM   # VLMEvalKit's system turn, else the template's
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
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


@hookimpl
def vlm_batch_generate(card, engine, requests):
    # <|im_end|> ends the assistant's turn (the checkpoint says so too); `post_process` is VLMEvalKit's
    # opt-in extraction of a \\boxed{} answer (off by default there, and here).
    clean = (lambda request, text: last_boxed(text)) if card.options.get("post_process") else None
    return generate(engine, requests, stop_tokens=(END,), clean=clean)
