"""The thread budget: how many threads each process of a run computes with, decided here alone.

On a CPU, vLLM's engine process runs the model on all cores but one. That one is this process's: it
feeds the engine (vLLM's multimodal processing of each request runs here, beside prompts, images and
the journal), with one torch thread; each preparation worker also computes with one. torch's default
of a thread per core in every process made them fight the engine for its cores: on 1024x768 photos a
run was 7x slower than VLMEvalKit's loop (3.2 against 22 items/s on 2 cores). On a GPU the model's
compute leaves the CPU, and this process and its workers share the cores.

How many workers prepare rows, unless the user says, is decided here too, from the cores and the size
of the images: decoding, VLMEvalKit's image dump and the plugin's work cost little on small images,
where a worker's round trip costs more than it saves, and a lot on photos and scans. Wherever there
are workers they also do vLLM's multimodal processing (`engines.rendering`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

PHOTO_BYTES = 32_000   # a mean image above this (base64, as in the TSV) is worth a worker's round trip
MAX_WORKERS = 8
SAMPLE_ROWS = 32
# Read once, at import: this process sets OMP_NUM_THREADS for a moment while it starts an engine
# process, and a worker forked in that moment would take our own setting for the user's.
USER_SET = "OMP_NUM_THREADS" in os.environ


def cores() -> int:
    return len(os.sched_getaffinity(0))


def user_set() -> bool:
    """OMP_NUM_THREADS in the user's environment is their own budget: we leave every process to it."""
    return USER_SET


def engine_share() -> int:
    """The threads vLLM's engine process computes with on a CPU."""
    return max(1, cores() - 1)


@contextmanager
def engine_process(cpu: bool):
    """The engine process, started inside this block, takes its share of the cores."""
    if not cpu or user_set():
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(engine_share())
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def beside_engine(cpu: bool):
    """This process computes with one torch thread while a vLLM engine runs the model on the CPU's
    other cores; the returned call gives it back its threads (a later model may run in-process)."""
    if not cpu or user_set():
        return lambda: None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return lambda: torch.set_num_threads(before)


def one_thread() -> None:
    """A preparation worker: one thread for torch and OpenMP, whatever it inherited. torch is set
    directly: OpenMP, once loaded (by the parent, before the fork), no longer reads the environment."""
    if user_set():
        return
    os.environ["OMP_NUM_THREADS"] = "1"   # for libraries not yet started in this process
    import torch   # the plugins' image code loads it anyway

    torch.set_num_threads(1)


def torch_threads() -> int:
    """This process's torch threads, as it reports them (0: torch not loaded here)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


def mean_image_bytes(datasets: dict) -> float:
    """The mean size of a row's images (base64 in the TSV, or the files it names), over the first rows."""
    sizes = []
    for dataset in datasets.values():
        data = getattr(dataset, "data", None)
        if data is None:
            continue
        head = data.head(SAMPLE_ROWS)
        if "image" in head:
            for value in head["image"]:
                parts = value if isinstance(value, list) else [value]
                sizes.append(sum(len(p) for p in parts if isinstance(p, str) and len(p) > 64))
        elif "image_path" in head:
            for value in head["image_path"]:
                parts = value if isinstance(value, list) else [value]
                sizes.append(sum(os.path.getsize(p) for p in parts if isinstance(p, str) and os.path.exists(p)))
    return sum(sizes) / len(sizes) if sizes else 0.0


def prep_workers(asked: int | None, datasets: dict) -> int:
    """The preparation workers: what the user asked for, or, for photo-sized images, one per core
    (at most MAX_WORKERS), or none for small ones."""
    if asked is not None:
        return asked
    if mean_image_bytes(datasets) < PHOTO_BYTES:
        return 0
    return min(MAX_WORKERS, cores())


def seen(worker_threads: dict) -> dict:
    """The budget as the processes hold it, for the run report: this process's torch threads, and each
    worker's and engine process's, as each reported them."""
    from .processes import started_since

    engines = {proc.pid: proc.torch_threads.value for proc in started_since(0)}
    return {"cores": cores(), "this_process": torch_threads(), "prep_workers": dict(worker_threads),
            "engine_processes": engines, "user_set": user_set()}
