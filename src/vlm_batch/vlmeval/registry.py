"""VLMEvalKit's model registry, `supported_VLM`: which class and arguments a model name stands for."""

from __future__ import annotations

import functools


def vlmeval_entry(model_name: str):
    """VLMEvalKit's `supported_VLM` entry for this name: usually a partial of its class and arguments."""
    import vlmeval.config

    return vlmeval.config.supported_VLM.get(model_name)


@functools.lru_cache(maxsize=None)
def vlmeval_class(model_name: str):
    entry = vlmeval_entry(model_name)
    return getattr(entry, "func", entry)

