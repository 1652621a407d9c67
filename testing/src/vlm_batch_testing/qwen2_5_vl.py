"""A tiny random Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) that vLLM and transformers both load.

Built from transformers' own classes with a tokenizer trained here; nothing comes from a model hub.
The vision encoder keeps Qwen2.5-VL's windowed attention, scaled down: a 56-px window (2 x 2 merged
cells) with block 0 windowed and block 1 full (`fullatt_block_indexes=[1]`), so a 112-px image (8 x 8
patches, 4 x 4 merged cells) spans four windows and goes through both kinds of block.
"""

from __future__ import annotations

SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE = 14, 2                      # image factor 28, as Qwen2-VL
TINY_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
WINDOW = 56                               # px; the real checkpoints use 112 (4 x 4 merged cells)

# What Qwen2.5-VL-Instruct's template renders for a single user turn: the Qwen2-VL layout, with
# "You are a helpful assistant." as the system turn when the conversation brings none.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" + IMAGE +
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny(path, init_std: float = 0.2) -> None:
    """Save a ~0.7M-parameter Qwen2.5-VL with random weights (std `init_std`) and its processor."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            # head_dim 64: 32 rotary frequencies split temporal/height/width as 16/24/24 in the real 128
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], initializer_range=init_std, tie_word_embeddings=False),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
            patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
            window_size=WINDOW, fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=init_std),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    _reinit(model, init_std)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, **TINY_PIXELS),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)


def _reinit(model, std: float) -> None:
    """Every weight matrix drawn again at `std` (transformers' init skips some, e.g. the vision patch
    embedding); norms and biases kept: outputs then vary with the input instead of collapsing to one token."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


def tiny_checkpoint() -> str:
    """The tiny Qwen2.5-VL, built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen2.5-vl", build_tiny)
