"""A tiny random Qwen3-VL (`Qwen3VLForConditionalGeneration`, dense) that vLLM and transformers both load.

Built from transformers' own classes with a tokenizer trained here; nothing comes from a model hub.
What makes it Qwen3-VL rather than Qwen2.5-VL, kept at small scale: 16-px patches (image factor 32),
a learned position embedding interpolated to the patch grid, DeepStack (features of vision blocks 0
and 1 merged separately and added to the first two decoder layers' hidden states), interleaved
M-RoPE, q/k norms, image mean/std 0.5, and a chat template with no default system turn.
`build_tiny(path, moe=True)` makes the MoE variant (`Qwen3VLMoeForConditionalGeneration`), which
`vlm_batch_testing.qwen3_vl_moe` caches.
"""

from __future__ import annotations

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
THINK_TOKENS = ["<think>", "</think>"]    # added tokens but not special: decoding keeps them, as Qwen3's do
PATCH, MERGE = 16, 2                      # image factor 32
TINY_PIXELS = {"min_pixels": 64 * 64, "max_pixels": 128 * 128}
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]


def chat_template(think_prefix: str = "") -> str:
    """What Qwen3-VL's template renders for one conversation without tools: a system turn only when
    given, then user turns with images and texts in their order. `think_prefix` follows the
    generation prompt: "" for Instruct, "<think>\\n" for the Thinking checkpoints."""
    return (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" + IMAGE +
        "{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}" + VIDEO +
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n" + think_prefix + "{% endif %}"
    )


def tokenizer(template: str):
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=template, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(THINK_TOKENS)
    return tok, {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + THINK_TOKENS}


def vision_config(init_std: float, deepstack: bool = True) -> dict:
    cfg = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
               patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
               num_position_embeddings=64, initializer_range=init_std)   # an 8 x 8 grid, interpolated
    if deepstack:
        cfg["deepstack_visual_indexes"] = [0, 1]
    return cfg


def token_ids(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def text_ids(ids: dict) -> dict:
    return dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def reinit(model, std: float) -> None:
    """Every weight matrix (and expert stack) drawn again at `std`, norms and biases kept: transformers'
    init leaves some at zero (the MoE router) or small, and outputs then collapse to one token."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


def save(model, processor_cls, tok, ids: dict, template: str, path) -> None:
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
    )

    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    size = {"shortest_edge": TINY_PIXELS["min_pixels"], "longest_edge": TINY_PIXELS["max_pixels"]}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                              size=size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD),
        tokenizer=tok, chat_template=template,
        video_processor=Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                              image_mean=IMAGE_MEAN, image_std=IMAGE_STD))
    processor.save_pretrained(path)


def build_tiny(path, init_std: float = 0.2, moe: bool = False, thinking: bool = False) -> None:
    """Save a ~0.9M-parameter Qwen3-VL (MoE: 4 experts, 2 per token) with random weights and its processor."""
    import torch
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
    )

    template = chat_template("<think>\n" if thinking else "")
    tok, ids = tokenizer(template)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                # 32 rotary frequencies, interleaved T/H/W as the real [24, 20, 20] of 64
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [12, 10, 10],
                                 "mrope_interleaved": True},
                initializer_range=init_std, tie_word_embeddings=False, **text_ids(ids))
    if moe:
        # moe_intermediate_size 48: neither 2 x 48 nor 48 equals the hidden size, so transformers' loader
        # can tell the hub layout of the expert tensors from its own (see `hub_expert_layout`)
        text.update(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                    norm_topk_prob=True)   # vLLM reads it (the real configs have it); transformers always renormalizes
        config = Qwen3VLMoeConfig(text_config=text, vision_config=vision_config(init_std), **token_ids(ids))
        model = Qwen3VLMoeForConditionalGeneration(config)
    else:
        config = Qwen3VLConfig(text_config=text, vision_config=vision_config(init_std), **token_ids(ids))
        model = Qwen3VLForConditionalGeneration(config)
    model = model.to(torch.float32)
    reinit(model, init_std)
    save(model, Qwen3VLProcessor, tok, ids, template, path)
    if moe:
        hub_expert_layout(path)


def hub_expert_layout(path) -> None:
    """Rewrite the fused expert tensors the way the released Qwen3-VL-MoE checkpoints store them.

    transformers 5.19 keeps `experts.gate_up_proj` as (experts, 2 x moe_intermediate, hidden) and
    `experts.down_proj` as (experts, hidden, moe_intermediate), and `save_pretrained` writes them so;
    the hub checkpoints (and vLLM 0.32's loader, which fails on the other layout with a size mismatch)
    have dims 1 and 2 swapped. transformers loads either: it transposes when the shape differs from
    its own, which is why the two must not coincide (2 x moe_intermediate != hidden != moe_intermediate).
    """
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    file = Path(path) / "model.safetensors"
    with safe_open(str(file), "pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for key, value in tensors.items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[key] = value.transpose(1, 2).contiguous()
    save_file(tensors, str(file), metadata=metadata)


def tiny_checkpoint() -> str:
    """The tiny dense Qwen3-VL (Instruct template), built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen3-vl", build_tiny)


def _build_thinking(path) -> None:
    build_tiny(path, thinking=True)


def tiny_thinking_checkpoint() -> str:
    """The same tiny Qwen3-VL with the Thinking checkpoints' template (the generation prompt opens
    "<think>\\n"), built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen3-vl-thinking", _build_thinking)
