"""The environment vLLM reads as it loads, for our engine process and for a judge's server alike:
CPU settings off-GPU, caches under ours, quiet logs; and where those caches live."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CPU_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",        # otherwise vLLM's message queue binds the public interface
    "VLLM_CPU_KVCACHE_SPACE": "1",      # GiB; vLLM-CPU's default takes a large share of RAM
}
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def cache_dir() -> Path:
    """Where built checkpoints and engine caches live; `VLM_BATCH_HOME` moves it (tests point it at a temp dir)."""
    root = os.environ.get("VLM_BATCH_HOME") or Path.home() / ".cache" / "vlm-batch"
    return Path(root)


def gpus_visible() -> bool:
    """Without importing torch: whether this machine shows NVIDIA GPUs to this process."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and shutil.which("nvidia-smi") is not None


def vllm_env(log_level: str = "ERROR") -> dict:
    """What vLLM needs set on this machine, each unless the user set it already."""
    want = {**QUIET_ENV, "VLLM_LOGGING_LEVEL": log_level, "VLLM_CACHE_ROOT": str(cache_dir() / "vllm")}
    if not gpus_visible():
        want.update(CPU_ENV, TORCHINDUCTOR_CACHE_DIR=str(cache_dir() / "inductor"))
    return {k: v for k, v in want.items() if k not in os.environ}


def prepare(verbose: bool = False) -> None:
    """This process's environment for vLLM, before it is imported."""
    import sys

    # We stop the engine process with SIGKILL (see vllm.stop); the semaphores it held are then freed by
    # multiprocessing's resource tracker, which says so at exit. That is cleanup, not a leak.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    os.environ.update(vllm_env("INFO" if verbose else "ERROR"))
