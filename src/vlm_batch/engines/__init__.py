"""Engines: each turns a stream of Requests into a stream of Results, the same small interface.

`generate(requests)` yields one Result per Request, in whatever order they finish; each Result
names its request. `close()` frees the device.
"""

from __future__ import annotations

ENGINES = ("vllm", "hf")


class EngineError(RuntimeError):
    """The engine as a whole failed (not one item): it could not start, or it died."""


def check_choice(card, name: str, trust_remote_code: bool = False) -> None:
    """Refuse, before anything loads, an engine the model lacks or remote code not opted into."""
    if name not in ENGINES:
        raise EngineError(f"Unknown engine '{name}'. Available: {', '.join(ENGINES)}")
    if name not in card.engines:
        raise EngineError(
            f"Model '{card.name}' has no {name} engine; it runs on: {', '.join(card.engines)}")
    if card.trust_remote_code and not trust_remote_code:
        raise EngineError(f"Model '{card.name}' runs code shipped with its checkpoint; "
                          "pass --trust-remote-code if you trust it")


def load_engine(name: str, card, **options):
    """Start the named engine for `card`; the import of its heavy library happens here."""
    check_choice(card, name, options.get("trust_remote_code", False))
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(card, **options)
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(card, **options)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
