"""Progress for the long phases: shown on a terminal, silent in logs and pipes."""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


def quiet_when_piped() -> None:
    """VLMEvalKit and vLLM draw tqdm bars of their own; without a terminal they are only noise."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def bar(total: int, desc: str, position: int = 0):
    """A tqdm bar with items/s and ETA, or a no-op one when nobody is watching."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", position=position, leave=True, dynamic_ncols=True,
                disable=not interactive(), smoothing=0.1)


def counted(items, progress):
    """Pass items through, counting each on `progress`."""
    for item in items:
        progress.update(1)
        yield item
