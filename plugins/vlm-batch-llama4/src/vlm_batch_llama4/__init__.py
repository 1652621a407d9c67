"""Llama 4 for vlm-batch: names, prompt format, image limit, engine arguments, post-processing, tiny checkpoint.

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
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                  "<|header_end|>", "<|eom|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                  "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|python_start|>",
                  "<|python_end|>"]
# Real checkpoints: 336-px tiles of 14-px patches, pixel shuffle 0.5 -> 144 tokens a tile, <= 16 tiles.
REAL_IMAGES = {"tile": 336, "patch": 14, "shuffle": 0.5, "max_tiles": 16}
TINY_IMAGES = {"tile": 56, "patch": 14, "shuffle": 0.5, "max_tiles": 4}


def render(content: list[tuple[str, str]]) -> str:
    """The chat text after `<|begin_of_text|>`: one user turn of (kind, text) parts, then the assistant's."""
    body = "".join(IMAGE if kind == "image" else text for kind, text in content)
    return f"<|header_start|>user<|header_end|>\n\n{body}{EOT}<|header_start|>assistant<|header_end|>\n\n"


def strip_eot(text: str | None) -> str | None:
    """VLMEvalKit's post-processing: a trailing `<|eot|>` is not part of the answer."""
    return text[:-len(EOT)] if text is not None and text.endswith(EOT) else text


def build_tiny(path) -> None:
    """A ~0.4M-parameter Llama 4 (MoE text layers, chunked attention, tiled vision), random weights of std 0.2."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessorFast, Llama4Processor
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                          pad_token="<|finetune_right_pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tok._tokenizer.post_processor = TemplateProcessing(   # as Llama's tokenizer: BOS on every text
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    stops = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    t = TINY_IMAGES
    torch.manual_seed(0)
    config = Llama4Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                         attention_chunk_size=256, no_rope_layer_interval=2, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=stops,
                         pad_token_id=ids["<|finetune_right_pad|>"]),
        # The pixel-shuffle adapter takes hidden_size / shuffle**2 features: that must be intermediate_size.
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=t["tile"], patch_size=t["patch"], pixel_shuffle_ratio=t["shuffle"],
                           vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                           initializer_range=0.2),
        boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    model = Llama4ForConditionalGeneration(config)   # float32 already; .to() would drop its complex rope buffer
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = ids["<|finetune_right_pad|>"]
    model.save_pretrained(path)
    image_processor = Llama4ImageProcessorFast(size={"height": t["tile"], "width": t["tile"]},
                                               max_patches=t["max_tiles"])
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tok, patch_size=t["patch"],
                                pixel_shuffle_ratio=t["shuffle"])   # with transformers' Llama 4 chat template
    processor.save_pretrained(path)


def tiny_checkpoint() -> str:
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-llama4", build_tiny)


@hookimpl
def vlm_batch_models():
    return [
        ModelCard(name="Llama-4-Scout-17B-16E-Instruct", family=FAMILY,
                  checkpoint="meta-llama/Llama-4-Scout-17B-16E-Instruct", max_new_tokens=MAX_NEW_TOKENS,
                  hf_class="Llama4ForConditionalGeneration", options={"max_images": MAX_IMAGES, **REAL_IMAGES},
                  vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MAX_IMAGES}}),
        ModelCard(name="tiny-llama4", family=FAMILY, checkpoint=tiny_checkpoint,
                  vlmeval_name="Llama-4-Scout-17B-16E-Instruct", max_new_tokens=12,
                  hf_class="Llama4ForConditionalGeneration", options={"max_images": 4, **TINY_IMAGES},
                  vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}},
                  description="random-weight Llama 4 built locally, for tests", test_only=True),
    ]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    if card.family != FAMILY:
        return None
    content, images = parts(message, card.options["max_images"])
    return Request(prompt=render(content), images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    if card.family != FAMILY:
        return None
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
    if card.family != FAMILY:
        return None
    from vlm_batch.memory import estimate_kv, model_config

    return estimate_kv(card, request, image_tokens, spans(model_config(card)))


def image_tokens(card, width, height) -> int:
    o = card.options
    per_tile = (o["tile"] // o["patch"]) ** 2 * o["shuffle"] ** 2
    # Tiles cover the image (at most max_tiles); several tiles get a separator each and a global view
    # after <|image|>; <|image_start|>, <|image|> and <|image_end|> frame it all.
    tiles = min(math.ceil(width / o["tile"]) * math.ceil(height / o["tile"]), o["max_tiles"])
    return int((tiles * (per_tile + 1) if tiles > 1 else 0) + per_tile + 3)
