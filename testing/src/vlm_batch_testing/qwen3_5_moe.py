"""A tiny random Qwen3.5 MoE (`Qwen3_5MoeForConditionalGeneration`): `qwen3_5`'s model with every decoder
layer's MLP made a sparse block of 4 experts (2 per token) plus a gated shared expert (the real
35B-A3B: 256 experts, 8 per token, one shared)."""

from __future__ import annotations

from vlm_batch_testing.qwen3_5 import IMAGE, MERGE, PATCH, TINY_PIXELS, VLLM_CPU_DTYPE  # noqa: F401
from vlm_batch_testing.qwen3_5 import build_tiny as _build


def build_tiny(path, init_std: float = 0.2) -> None:
    _build(path, init_std=init_std, moe=True)


def tiny_checkpoint() -> str:
    """The tiny Qwen3.5 MoE, built once into the cache."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-qwen3.5-moe", build_tiny)
