"""VLMEvalKit's LLM judge, served locally: a `vllm serve` child on loopback (`server`), its numbers
(`metrics`), and how a suite's scoring uses it (`service`).

VLMEvalKit already talks to any OpenAI-compatible judge (`api_base` in its judge arguments) and sends
it `nproc` requests at a time. So a local judge is only a server: we start vLLM's own OpenAI server
for the model on 127.0.0.1 and a free port, wait until it answers, hand VLMEvalKit its address, and
stop it. Prompts, answer extraction and scores stay VLMEvalKit's.
"""

from __future__ import annotations

import os
from pathlib import Path

EXACT = "exact_matching"
DEFAULT_NPROC = 64


class JudgeError(RuntimeError):
    """The judge could not be started or stopped answering; the message says why, in one line."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats


def is_local(name: str | None) -> bool:
    """Whether --judge names a model for us to serve (a vlm-batch model, a path, a hub id `org/name`);
    anything else (gpt-4o-mini, chatgpt-0125, ...) is a judge VLMEvalKit's `build_judge` names."""
    if not name or name == EXACT:
        return False
    from ..plugins import get_models

    return name in get_models() or os.path.exists(name) or "/" in name


def resolve(name: str) -> str:
    """The checkpoint vLLM loads for --judge NAME: a card's path, a local folder, or the hub id itself."""
    from ..plugins import get_models

    cards = get_models()
    if name in cards:
        return cards[name].path()
    if os.path.exists(name):
        return str(Path(name).resolve())
    return name

