"""The engine each model runs on, decided once, before anything loads.

`auto` takes vLLM where it is installed and the card lists it, else transformers, saying why; an
engine named explicitly is that engine or an error. An auto choice of vLLM may still fall back to
transformers when vLLM fails to start (`start.EngineStart`), which `Choice.may_fall_back` allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import CHOICES, NO_VLLM, EngineError, vllm_installed


@dataclass(frozen=True)
class Choice:
    engine: str                      # what starts: vllm | hf
    asked: str = "auto"              # what was asked: auto | vllm | hf
    fallback: str | None = None      # why transformers runs where vLLM was asked for (auto only)

    def may_fall_back(self, card, options: dict) -> bool:
        """Whether a failed vLLM start may become a transformers start (auto, one GPU per engine)."""
        return (self.asked == "auto" and self.engine == "vllm" and "hf" in card.engines
                and options.get("tensor_parallel_size", 1) <= 1)


def choose(card, asked: str) -> Choice:
    """The engine to start for `asked`, and, when `auto` cannot start with vLLM, why not."""
    if asked != "auto":
        return Choice(asked, asked)
    if "vllm" not in card.engines:
        return Choice("hf", asked, f"{card.name} has no vLLM path")
    if "hf" in card.engines and not vllm_installed():
        return Choice("hf", asked, NO_VLLM)
    return Choice("vllm", asked)


def decide(card, asked: str, trust_remote_code: bool = False) -> Choice:
    """The choice, or an EngineError before anything loads: an engine the model lacks, vLLM asked for
    and missing, a model that cannot run without a GPU on a machine without one, or a checkpoint
    that ships code the user did not opt into."""
    if asked not in CHOICES:
        raise EngineError(f"Unknown engine '{asked}'. Available: {', '.join(CHOICES)}")
    if asked != "auto" and asked not in card.engines:
        raise EngineError(f"Model '{card.name}' has no {asked} engine; it runs on: {', '.join(card.engines)}")
    choice = choose(card, asked)
    if choice.engine == "vllm" and not vllm_installed():
        raise EngineError(f"{NO_VLLM}; use --engine hf, or --engine auto to fall back to it")
    if card.gpu_only:
        from .environment import gpus_visible

        if not gpus_visible():
            raise EngineError(f"Model '{card.name}' needs a GPU: {card.gpu_only}")
    if card.trust_remote_code and not trust_remote_code:
        raise EngineError(f"Model '{card.name}' runs code shipped with its checkpoint; "
                          "pass --trust-remote-code if you trust it")
    return choice
