"""Engines: each turns a stream of Requests into a stream of Results, the same small interface.

`generate(requests)` yields one Result per Request, in whatever order they finish; each Result
names its request. `close()` frees the device.
"""

from __future__ import annotations

import importlib.util

ENGINES = ("vllm", "hf")
CHOICES = ("auto", *ENGINES)   # auto: vLLM where it can run the model, else transformers
HF_ONLY = ("max_batch_memory",)   # options that size transformers batches; vLLM sizes its own
NO_VLLM = "vLLM is not installed (pip install 'vlm-batch[vllm]')"


class EngineError(RuntimeError):
    """The engine as a whole failed (not one item): it could not start, or it died."""


def vllm_installed() -> bool:
    """Whether vLLM can be imported, without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):   # ValueError: blocked in sys.modules
        return False


def load(name: str, card, **options):
    """Start the named engine (vllm or hf, already decided: see `choice`) for `card`; the import of its
    heavy library happens here."""
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(card, **{k: v for k, v in options.items() if k not in HF_ONLY})
    from .hf import HFEngine

    return HFEngine(card, **options)


def preload(name: str, verbose: bool = False) -> bool:
    """The engine library's imports, here and now; True when its engine runs in a process of its own."""
    if name == "vllm":
        from .vllm import preload as vllm_preload

        vllm_preload(verbose)
        return True
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return False


def token_ids(tokenizer, tokens) -> set:
    """The ids of those tokens the vocabulary has (a missing one would map to <unk> and stop on it)."""
    ids = set()
    for token in tokens:
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == token:
            ids.add(i)
    return ids


# A card's `generation` (VLMEvalKit's sampling arguments, or a config's): vLLM's SamplingParams names.
HF_DROPS = ("presence_penalty", "frequency_penalty", "seed", "min_p")   # transformers' generate lacks them


def sampling(generation, engine: str) -> dict:
    """A card's sampling settings as `engine` takes them; none: greedy. `do_sample` False, or a
    temperature of 0, is greedy on both. transformers samples only with `do_sample`, and has no
    presence penalty (VLMEvalKit's transformers paths do not pass it either)."""
    settings = dict(generation or {})
    sample = settings.pop("do_sample", None)
    if sample is None:
        sample = float(settings.get("temperature", 0) or 0) > 0
    if engine == "vllm":
        return {**settings, "temperature": settings.get("temperature", 1.0)} if sample else \
            {**{k: v for k, v in settings.items() if k not in ("temperature", "top_p", "top_k")}, "temperature": 0.0}
    settings = {k: v for k, v in settings.items() if k not in HF_DROPS}
    if not sample:
        return {"do_sample": False, **{k: v for k, v in settings.items() if k not in ("temperature", "top_p", "top_k")}}
    return {"do_sample": True, **settings}


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
