"""The tiny Qwen2-VL architecture, where the embedded `tiny-qwen2-vl` was trained from (`train_qwen2_vl`)."""

from __future__ import annotations

from vlm_batch_qwen2_vl import IMAGE, SYSTEM, TINY_PIXELS

from .tiny import save_model, train_tokenizer

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


def build_tiny(path, init_std: float = 0.02, text: dict | None = None, vision: dict | None = None) -> None:
    """The tiny Qwen2-VL architecture (1.3M parameters) with random weights: where training starts."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

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
    save_model(model, path, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**TINY_PIXELS), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
