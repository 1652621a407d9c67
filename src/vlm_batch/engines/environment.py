"""Where the engines keep their caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built checkpoints and engine caches live; `VLM_BATCH_HOME` moves it (tests point it at a temp dir)."""
    root = os.environ.get("VLM_BATCH_HOME") or Path.home() / ".cache" / "vlm-batch"
    return Path(root)
