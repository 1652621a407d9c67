"""Every touch of VLMEvalKit: its datasets and their checks, the prompts it would send, its files, its
scoring and its judges' caches, its model registry, and its own inference loop (for comparison).
Nothing else in vlm-batch imports `vlmeval`.

We call VLMEvalKit's own code rather than restating it, so prompts and files match it by construction;
this package only decides which of its pieces to call, as `infer_data` does.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_JUDGE = "exact_matching"


class DatasetError(ValueError):
    pass


def lmudata_root() -> Path:
    """VLMEvalKit's data root, resolved as VLMEvalKit does, without importing it."""
    env = os.environ.get("LMUData")
    if env and os.path.exists(env):
        return Path(env)
    return Path.home() / "LMUData"


def quiet_import():
    """VLMEvalKit logs an error when it finds no .env file; that is normal for us."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            import vlmeval.dataset  # noqa: F401
        finally:
            logging.disable(previous)
