"""A tiny random Qwen3-VL MoE (`Qwen3VLMoeForConditionalGeneration`): `qwen3_vl`'s model with every
decoder layer's MLP made a sparse block of 4 experts, 2 per token (the real 30B-A3B: 128 experts, 8)."""

from __future__ import annotations

from vlm_batch_testing.qwen3_vl import IMAGE, MERGE, PATCH, TINY_PIXELS  # noqa: F401  (the family's facts)
from vlm_batch_testing.qwen3_vl import build_tiny as _build


def build_tiny(path, init_std: float = 0.2) -> None:
    _build(path, init_std=init_std, moe=True)


def tiny_checkpoint() -> str:
    """The tiny Qwen3-VL MoE (Instruct template), built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen3-vl-moe", build_tiny)
