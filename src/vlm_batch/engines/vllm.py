"""The vLLM engine, offline (`vllm.LLM`), fed as a stream.

A bounded window of requests stays in vLLM's queue and is refilled as each one finishes, so the
scheduler always has work and the running set never drains between batches; each Result is
yielded the moment its request finishes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import contextmanager
from multiprocessing import context as mp_context
from collections import Counter
from dataclasses import dataclass

from ..request import Result
from . import EngineError, on_gpu, token_ids

log = logging.getLogger(__name__)

CPU_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",        # otherwise vLLM's message queue binds the public interface
    "VLLM_CPU_KVCACHE_SPACE": "1",      # GiB; vLLM-CPU's default takes a large share of RAM
}
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def prepare_env(verbose: bool = False) -> None:
    """Environment vLLM reads at import: CPU settings off-GPU, caches under ours, quiet logs."""
    import sys

    from .environment import cache_dir

    # We stop the engine process with SIGKILL (see close); the semaphores it held are then freed by
    # multiprocessing's resource tracker, which says so at exit. That is cleanup, not a leak.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    if not on_gpu():
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def preload(verbose: bool = False) -> None:
    """vLLM's heavy imports, in the calling thread: an engine then started in another thread spawns
    its process at once, instead of waiting on import locks other threads hold. First, the process
    the engine will be forked from starts importing the same, on another core (see `_forkserver`)."""
    prepare_env(verbose)
    _forkserver()
    from vllm import LLM, SamplingParams   # noqa: F401
    import vllm.v1.engine.core   # noqa: F401


CHILD_IMPORTS = ["vlm_batch.engines.vllm_child"]


def _forkserver() -> None:
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
    with _engine_threads(not _cuda_visible()):
        forkserver.ensure_running()


def _cuda_visible() -> bool:
    """Without importing torch: whether this machine shows NVIDIA GPUs."""
    import shutil

    return os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and shutil.which("nvidia-smi") is not None


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
def _engine_process_from_forkserver():
    """vLLM's engine process, forked from the forkserver instead of spawned (see `_forkserver`)."""
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


def _one_engine_process(args: dict) -> None:
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
def _engine_threads(cpu: bool):
    """The engine process, spawned inside this block, takes all cores but one: that one is ours."""
    if not cpu or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


@dataclass
class WindowStats:
    """What the window looked like at each engine step: evidence the queue never ran dry."""
    steps: int = 0
    steps_with_pending: int = 0      # steps taken while more requests were still to come
    min_in_flight_with_pending: int | None = None
    max_in_flight: int = 0
    in_flight_sum: int = 0
    rejected: int = 0                # requests vLLM refused at submission (bad item, too long)
    boundary_steps: int = 0          # steps whose running set held rows of two datasets or more
    min_in_flight_at_boundary: int | None = None

    def record(self, in_flight: int, pending: bool, datasets: int = 1) -> None:
        self.steps += 1
        if datasets > 1:
            self.boundary_steps += 1
            if self.min_in_flight_at_boundary is None or in_flight < self.min_in_flight_at_boundary:
                self.min_in_flight_at_boundary = in_flight
        self.in_flight_sum += in_flight
        self.max_in_flight = max(self.max_in_flight, in_flight)
        if pending:
            self.steps_with_pending += 1
            if self.min_in_flight_with_pending is None or in_flight < self.min_in_flight_with_pending:
                self.min_in_flight_with_pending = in_flight


def engine_args(card, *, batch_size: int | None = None, trust_remote_code: bool = False, **overrides) -> dict:
    """`vllm.LLM`'s arguments for this card on this machine (on CPU: float32, eager, one process)."""
    args = {"model": card.path(), "seed": 0, **card.vllm_args}
    cpu = not on_gpu()
    if cpu:
        args.update({"dtype": "float32", "enforce_eager": True, **card.vllm_cpu_args})
    if batch_size:
        args["max_num_seqs"] = batch_size
    args["trust_remote_code"] = trust_remote_code
    args.update(overrides)
    if cpu:
        _one_engine_process(args)
    return args


class VLLMEngine:
    name = "vllm"

    def __init__(self, card, *, batch_size: int | None = None, window: int | None = None, gate: int = 32,
                 trust_remote_code: bool = False, verbose: bool = False, **overrides):
        prepare_env(verbose)
        from vllm import LLM

        args = engine_args(card, batch_size=batch_size, trust_remote_code=trust_remote_code, **overrides)
        cpu = not on_gpu()
        self.card = card
        self.args = {k: v for k, v in args.items() if k not in ("model", "distributed_executor_backend")}
        args.setdefault("use_tqdm_on_load", verbose)   # its weight-loading bar ignores TQDM_DISABLE
        try:
            with _engine_threads(cpu), _engine_process_from_forkserver():
                self.llm = LLM(**args)
        except Exception as exc:
            raise EngineError(f"vLLM could not start {card.name}: {type(exc).__name__}: {exc}") from exc
        max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # Twice the running set: a finished slot is refilled from requests already queued.
        self.window = window or 2 * max_seqs
        self.gate = gate
        self.max_num_seqs = max_seqs
        self.stats = WindowStats()
        self._params: dict = {}
        self._watch_engine_core()

    def _watch_engine_core(self) -> None:
        """Turn the engine core's death into an error where we wait for its output.

        vLLM's own monitor marks the client dead and shuts it down, but a caller already blocked
        in `step()` waits on the output queue forever (vLLM 0.32). We post the error there.
        """
        import threading

        from vllm.v1.engine.exceptions import EngineDeadError

        core = self.llm.llm_engine.engine_core
        resources, outputs = getattr(core, "resources", None), getattr(core, "outputs_queue", None)
        if resources is None or outputs is None:   # engine core in this process: nothing to watch
            return
        llm = self.llm

        def watch():
            while self.llm is llm:
                if resources.engine_dead:
                    outputs.put_nowait(EngineDeadError("the engine core process exited"))
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, name="vlm-batch-engine-watch", daemon=True).start()

    def _sampling(self, max_new_tokens: int, stop_tokens: tuple = ()):
        """Greedy settings, built once per length: vLLM copies them into each request anyway."""
        from vllm import SamplingParams

        key = (max_new_tokens, stop_tokens)
        if key not in self._params:
            extra = {}
            if stop_tokens:
                extra["stop_token_ids"] = sorted(token_ids(self.llm.get_tokenizer(), stop_tokens))
            self._params[key] = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0,
                                               **extra, **self.card.generation)
        return self._params[key]

    def _submit(self, request, stop_tokens: tuple = ()) -> str:
        prompt = {"prompt": request.prompt}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images}
        if request.mm_kwargs:
            prompt["mm_processor_kwargs"] = request.mm_kwargs
        (request_id,) = self.llm.enqueue([prompt], self._sampling(request.max_new_tokens, stop_tokens),
                                         use_tqdm=False)
        return request_id.split("-")[0]  # vLLM appends a random suffix internally; outputs use the base id

    def generate(self, requests, stop_tokens: tuple = (), batch=None):
        """Results as requests finish; EngineError if vLLM's engine process dies. `stop_tokens` end
        answers besides the checkpoint's end tokens; `batch` (transformers batch code) does not apply."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield from self._stream(requests, tuple(stop_tokens))
        except EngineDeadError as exc:
            raise EngineError(f"vLLM's engine process died ({exc})") from exc

    def _stream(self, requests, stop_tokens: tuple = ()):
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.llm.llm_engine
        stats = self.stats = WindowStats()   # per call, so a caller reads this run's window alone
        in_flight: dict[str, object] = {}
        datasets: Counter = Counter()   # requests in flight per dataset: a suite's boundaries show here
        source = iter(requests)
        pending = True
        while True:
            while pending and len(in_flight) < self.window:
                # Prepare a group before handing any to vLLM: a trickle would have it run near-empty steps.
                want = min(self.window - len(in_flight), self.gate)
                group = list(itertools.islice(source, want))
                pending = len(group) == want
                for request in group:
                    try:
                        in_flight[self._submit(request, stop_tokens)] = request
                        datasets[request.dataset] += 1
                    except EngineDeadError:
                        raise
                    except Exception as exc:  # vLLM validates per request: too long, bad image, ...
                        stats.rejected += 1
                        yield Result.failed(request.index, exc, request.dataset)
            if not in_flight:
                return
            stats.record(len(in_flight), pending, len(datasets))
            for out in engine.step():
                if not out.finished:
                    continue
                request = in_flight.pop(out.request_id)
                datasets[request.dataset] -= 1
                if not datasets[request.dataset]:
                    del datasets[request.dataset]
                completion = out.outputs[0]
                yield Result(index=request.index, dataset=request.dataset, text=completion.text,
                             prompt_tokens=len(out.prompt_token_ids or ()),
                             output_tokens=len(completion.token_ids))

    def run_batch(self, requests: list) -> list:
        """Exactly these requests together, waiting for all: the fixed-batch pattern, for comparison."""
        by_index = {r.index: r for r in self.generate(requests)}
        return [by_index[r.index] for r in requests]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            stop(llm)


def stop(llm) -> None:
    """Stop a `vllm.LLM`'s engine process at once: nothing in it is worth its seconds of orderly
    teardown (every answer we keep has already reached us), and vLLM's own shutdown would wait."""
    core = llm.llm_engine.engine_core
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    processes = list(getattr(manager, "processes", None) or ())
    stopped = getattr(manager, "manager_stopped", None)
    if stopped is not None:
        stopped.set()   # its liveness monitor: this death is ours, not a crash
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(timeout=10)
    try:
        core.shutdown()
    except Exception as exc:   # a dead engine may not shut down cleanly; nothing is left to save
        log.debug("vLLM shutdown: %s", exc)
