"""The processes beside ours: vLLM's engine process, forked from a forkserver that imported torch and
vLLM beside this process's own import, and the cores each process takes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from multiprocessing import context as mp_context

from .environment import gpus_visible

CHILD_IMPORTS = ["vlm_batch.engines.vllm_child"]


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
    with engine_threads(not gpus_visible()):
        forkserver.ensure_running()



class _Carried(mp_context.ForkServerProcess):
    """A forkserver process that takes this process's environment of the moment with it."""

    def start(self):
        self._environ = dict(os.environ)
        super().start()

    def run(self):
        try:   # before the environment changes: setproctitle finds argv's memory through it once
            import setproctitle

            setproctitle.getproctitle()
        except ImportError:
            pass
        os.environ.clear()
        os.environ.update(self._environ)
        super().run()


class _CarriedContext(mp_context.ForkServerContext):
    Process = _Carried


def _carried_context():
    """vLLM's process context for its engine process: forked from our forkserver, when it runs."""
    return _CarriedContext() if _forkserver_running() else None


def _forkserver_running() -> bool:
    from multiprocessing import forkserver

    server = forkserver._forkserver
    return getattr(server, "_forkserver_pid", None) is not None


@contextmanager
def engine_process_from_forkserver():
    """vLLM's engine process, forked from the forkserver instead of spawned (see `start_forkserver`)."""
    import vllm.v1.engine.utils as engine_utils

    ctx = _carried_context()
    if ctx is None:
        yield
        return
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


@contextmanager
def engine_threads(cpu: bool):
    """The engine process, spawned inside this block, takes all cores but one: that one is ours."""
    if not cpu or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]

