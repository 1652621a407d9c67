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


def preload(name: str, verbose: bool = False) -> bool:
    """The engine library's imports, here and now; True when its engine runs in a process of its own."""
    if name == "vllm":
        from .vllm import preload as load

        load(verbose)
        return True
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return False


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_stats(engine) -> dict:
    """What the engine saw in its latest run: its settings, vLLM's window, the batches and splits."""
    out = {"args": {k: v for k, v in getattr(engine, "args", {}).items()
                    if isinstance(v, (int, float, str, bool))}}
    window = getattr(engine, "stats", None)
    if window is not None:
        out["window"] = {"size": engine.window, "max_num_seqs": engine.max_num_seqs, "steps": window.steps,
                         "min_in_flight_while_pending": window.min_in_flight_with_pending,
                         "mean_in_flight": round(window.in_flight_sum / max(window.steps, 1), 1),
                         "rejected": window.rejected, "boundary_steps": window.boundary_steps,
                         "min_in_flight_at_boundary": window.min_in_flight_at_boundary}
    last = getattr(engine, "last", None)
    if last:
        collector, metrics = last
        out["collector"] = {"batches": collector.batches, "causes": dict(collector.causes)}
        out["processor"] = metrics.as_dict()
    return out
