"""A tiny MiniCPM-V 4.6 (SigLIP-style tower with merger, Qwen3.5 text model), random weights, for tests."""

from __future__ import annotations

from .tiny import ensure_checkpoint, randomize, save_model, train_tokenizer

# ChatML, as MiniCPM-V 4.6's template renders one user turn; used for the tiny checkpoint.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_pad|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<image>",
                  "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"]
NAMED_TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", image_start_token="<image>",
                    image_end_token="</image>", slice_start_token="<slice>", slice_end_token="</slice>",
                    image_id_start_token="<image_id>", image_id_end_token="</image_id>")
TINY_PIXELS = {"scale_resolution": 56, "patch_size": 14, "max_slice_nums": 4}


def build_tiny(path) -> None:
    """A ~0.3M-parameter MiniCPM-V 4.6 (SigLIP-style tower with merger, Qwen3.5 text model with one
    linear-attention and one full-attention layer), random weights of std 0.2."""
    import torch
    from transformers import (MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6ImageProcessor,
                              MiniCPMV4_6Processor, MiniCPMV4_6VideoProcessor)

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=TINY_CHAT_TEMPLATE, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=NAMED_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(0)
    config = MiniCPMV4_6Config(
        text_config=dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                         linear_num_value_heads=1, layer_types=["linear_attention", "full_attention"],
                         max_position_embeddings=2048, initializer_range=0.2,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, insert_layer_id=1),
        insert_layer_id=1, image_size=56, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    model = MiniCPMV4_6ForConditionalGeneration(config)
    randomize(model)
    save_model(model, path, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    processor = MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessor(**TINY_PIXELS),
                                     video_processor=MiniCPMV4_6VideoProcessor(**TINY_PIXELS), tokenizer=tok,
                                     chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(path)


def tiny_checkpoint() -> str:
    return ensure_checkpoint("tiny-minicpm-v", build_tiny)
