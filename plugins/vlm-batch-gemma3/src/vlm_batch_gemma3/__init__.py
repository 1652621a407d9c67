"""Gemma 3 for vlm-batch: names, prompt format, image limit, engine arguments, memory.

The system prompt. VLMEvalKit's `Gemma3` puts "You are a helpful assistant. " in front of every
question on its transformers path (its default: `Gemma3-4B` & co. are built without `use_vllm`) and
drops it on its vLLM path. We keep it on both engines: the default path is the one VLMEvalKit's
published Gemma3 scores come from, and one model name must mean one prompt whichever engine runs it.

The BOS token. Gemma's tokenizer adds `<bos>` itself, so the prompt text starts after it: the
engines tokenize with special tokens on, and a `<bos>` in the text as well would give the model two
(VLMEvalKit's vLLM path does that; its transformers path does not).
"""

from __future__ import annotations

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts

FAMILY = "gemma3"
SYSTEM = "You are a helpful assistant. "   # VLMEvalKit's Gemma3 default system prompt
MAX_IMAGES = 24                            # VLMEvalKit's limit_mm_per_prompt for Gemma3
MAX_NEW_TOKENS = 4096                      # VLMEvalKit's Gemma3 default
IMAGE = "<start_of_image>"                 # the processor expands it into the image's soft tokens
IMAGE_TOKENS = 256                         # mm_tokens_per_image of every Gemma 3 checkpoint

END_OF_TURN = ("<end_of_turn>",)   # ends the model's turn: pre-trained checkpoints list only <eos>


def render(system: str | None, content: list[tuple[str, str]]) -> str:
    """The chat text after `<bos>`: one user turn of (kind, text) parts, then the model's turn."""
    head = f"{system}\n\n" if system else ""
    body = "".join(IMAGE if kind == "image" else text.strip() for kind, text in content)
    return f"<start_of_turn>user\n{head}{body}<end_of_turn>\n<start_of_turn>model\n"


def _card(name, checkpoint, **kw):
    return ModelCard(name=name, family=FAMILY, checkpoint=checkpoint,
                     prompt_attrs={"system_prompt": SYSTEM}, **kw)


@hookimpl
def vlm_batch_models():
    real = dict(max_new_tokens=MAX_NEW_TOKENS, hf_class="Gemma3ForConditionalGeneration",
                options={"system": SYSTEM, "max_images": MAX_IMAGES, "image_tokens": IMAGE_TOKENS},
                vllm_args={"max_model_len": 16384, "limit_mm_per_prompt": {"image": MAX_IMAGES}})
    return [
        _card("Gemma3-4B", "google/gemma-3-4b-it", **real),
        _card("Gemma3-12B", "google/gemma-3-12b-it", **real),
        _card("Gemma3-27B", "google/gemma-3-27b-it", **real),
    ]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    content, images = parts(message, card.options["max_images"])
    return Request(prompt=render(card.options.get("system"), content), images=images,
                   max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    return generate(engine, requests, stop_tokens=END_OF_TURN)


def image_tokens(card, width, height) -> int:
    # Every image is resized to one square: a fixed count, plus "\n\n<boi>" and "<eoi>\n\n".
    return card.options["image_tokens"] + 4


def spans(cfg: dict) -> list:
    """5 of every 6 layers keep a sliding window (1024 tokens in Gemma 3) and the 6th keeps all; configs
    saved before `layer_types` existed say so with `sliding_window_pattern`."""
    from vlm_batch.memory import FULL, layer_spans, text_config

    t = text_config(cfg)
    if t.get("layer_types"):
        return layer_spans(cfg)
    every = int(t.get("sliding_window_pattern") or 6)
    window = int(t.get("sliding_window") or 1024)
    return [FULL if (i + 1) % every == 0 else window for i in range(int(t["num_hidden_layers"]))]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv, model_config

    return estimate_kv(card, request, image_tokens, spans(model_config(card)))
