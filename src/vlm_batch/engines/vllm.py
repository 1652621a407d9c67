"""The vLLM engine, offline (`vllm.LLM`), fed as a stream.

A bounded window of requests stays in vLLM's queue and is refilled as each one finishes, so the
scheduler always has work and the running set never drains between batches; each Result is
yielded the moment its request finishes.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass

from ..request import Result
from . import HF_ONLY, EngineError, on_gpu, sampling, token_ids
from . import environment
from .processes import engine_process_context, one_engine_process, start_forkserver
from .rendering import Rendering, key_of, vllm_prompt
from ..stages import here as costs
from .threads import beside_engine, engine_process

log = logging.getLogger(__name__)


def preload(verbose: bool = False) -> None:
    """vLLM's heavy imports, in the calling thread: an engine then started in another thread spawns
    its process at once, instead of waiting on import locks other threads hold. First, the process
    the engine will be forked from starts importing the same, on another core (see `processes.start_forkserver`)."""
    environment.prepare(verbose)
    start_forkserver()
    from vllm import LLM, SamplingParams   # noqa: F401
    import vllm.v1.engine.core   # noqa: F401


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
    """`vllm.LLM`'s arguments for this card on this machine (on CPU: float32, eager, one process).

    vLLM's processed-image cache is off unless the card or the user turns it on: it would tie the
    rendering of every request to this one process (see `rendering`), and benchmark rows rarely
    repeat an image."""
    args = {"model": card.path(), "seed": 0, "mm_processor_cache_gb": 0, **card.vllm_args}
    cpu = not on_gpu()
    if cpu:
        args.update({"dtype": "float32", "enforce_eager": True, **card.vllm_cpu_args})
    if batch_size:
        args["max_num_seqs"] = batch_size
    args["trust_remote_code"] = trust_remote_code
    args.update(overrides)
    if cpu:
        one_engine_process(args)
    return args


OWN_OPTIONS = ("window", "gate", "verbose")   # VLLMEngine's own; the rest of its options are `engine_args`'


def rendering(card, options: dict, wanted=None) -> Rendering | None:
    """How preparation workers render for the engine `options` start, or None where only it can;
    `wanted` says whether that engine is still to be vLLM's."""
    kept = {k: v for k, v in options.items() if k not in (*OWN_OPTIONS, *HF_ONLY)}
    return Rendering.of(engine_args(card, **kept), wanted)


FIRST_STEP_S = 0.05   # a guess at a step's time until one is measured: small images fill the window first


class VLLMEngine:
    name = "vllm"

    def __init__(self, card, *, batch_size: int | None = None, window: int | None = None, gate: int = 32,
                 trust_remote_code: bool = False, verbose: bool = False, **overrides):
        environment.prepare(verbose)
        from vllm import LLM

        args = engine_args(card, batch_size=batch_size, trust_remote_code=trust_remote_code, **overrides)
        cpu = not on_gpu()
        self.card = card
        self.args = {k: v for k, v in args.items() if k not in ("model", "distributed_executor_backend")}
        self.rendering_key = key_of(args)   # requests rendered for this key are taken as they are
        self._ids = itertools.count()
        args.setdefault("use_tqdm_on_load", verbose)   # its weight-loading bar ignores TQDM_DISABLE
        try:
            with engine_process(cpu), engine_process_context():
                self.llm = LLM(**args)
        except Exception as exc:
            raise EngineError(f"vLLM could not start {card.name}: {type(exc).__name__}: {exc}") from exc
        self._threads_back = beside_engine(cpu)
        self._time_rendering()
        max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # Twice the running set: a finished slot is refilled from requests already queued.
        self.window = window or 2 * max_seqs
        self.gate = gate
        self.max_num_seqs = max_seqs
        self.stats = WindowStats()
        self._params: dict = {}
        self._watch_engine_core()

    def _time_rendering(self) -> None:
        """vLLM's multimodal processing and tokenizing of each prompt (its renderer, run in this process
        inside `enqueue`) timed as a stage of its own. A private method: where a vLLM lacks it, the
        submission's time holds it."""
        render = getattr(self.llm, "_preprocess_cmpl_one", None)
        if render is None:
            return

        def timed(*args, **kwargs):
            with costs.stage("render"):
                return render(*args, **kwargs)

        self.llm._preprocess_cmpl_one = timed

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
        """Greedy unless the card samples, built once per length: vLLM copies them into each request
        anyway. The per-request seed makes a sampled answer the same whatever its batch."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        key = (max_new_tokens, stop_tokens)
        if key not in self._params:
            params = {"temperature": 0.0, "max_tokens": max_new_tokens, "seed": 0,
                      "output_kind": RequestOutputKind.FINAL_ONLY}   # what `enqueue` sets: the answer only
            if stop_tokens:
                params["stop_token_ids"] = sorted(token_ids(self.llm.get_tokenizer(), stop_tokens))
            self._params[key] = SamplingParams(**{**params, **sampling(self.card.generation, "vllm")})
        return self._params[key]

    def takes(self, request) -> bool:
        """Whether a worker-rendered request can come here as it is: rendered for this engine's
        arguments, and not yet sent (once sent, its input is let go: see `_submit`)."""
        return request.rendered is not None and request.rendered[0] == self.rendering_key and \
            request.rendered[1] is not None

    def _rendered(self, request):
        """vLLM's input for a request a worker rendered for this engine; None: this process renders it."""
        if request.rendered is None:
            return None
        if not self.takes(request):   # its images are gone: rendering it here would drop them
            raise ValueError("it was rendered for a vLLM engine with other arguments, or already sent")
        return request.rendered[1]

    def render(self, request) -> None:
        """What `enqueue` does to a request in this process, without the model: `bench`'s feed ceiling."""
        if self._rendered(request) is None:
            self.llm._preprocess_cmpl_one(vllm_prompt(request))

    def _submit(self, request, stop_tokens: tuple = ()) -> str:
        params = self._sampling(request.max_new_tokens, stop_tokens)
        engine_input = self._rendered(request)
        with costs.stage("submit"):   # a rendering, inside, is a stage of its own
            if engine_input is not None:   # vLLM's documented path for inputs rendered elsewhere
                request_id = self.llm.llm_engine.add_request(f"w{next(self._ids)}", engine_input, params)
                # Sent: its tensors, each holding an open descriptor while alive, go now, not when it is
                # answered. A restart prepares it again (`placement.stream`).
                request.rendered = (request.rendered[0], None)
            else:
                (request_id,) = self.llm.enqueue([vllm_prompt(request)], params, use_tqdm=False)
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
        step_s = FIRST_STEP_S
        while True:
            while pending and len(in_flight) < self.window:
                # Prepare a group before handing any to vLLM: a trickle would have it run near-empty steps.
                want = min(self.window - len(in_flight), self.gate)
                started = time.perf_counter()
                group = list(itertools.islice(source, want))
                prepared_s = time.perf_counter() - started
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
                if in_flight and prepared_s > step_s:
                    break   # the feed is slower than the engine (large images): let it step meanwhile
            if not in_flight:
                return
            stats.record(len(in_flight), pending, len(datasets))
            started = time.perf_counter()
            outputs = engine.step()
            step_s = time.perf_counter() - started
            for out in outputs:
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
            self._threads_back()


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

