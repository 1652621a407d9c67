"""Where a run happens: one process (this module), torchrun ranks (`sharded`) or Ray replicas
(`ray_runner`). A placement is chosen once, by `suite.placement_for`, and gives the executor:

- `share(n)`: the rows of a dataset this process answers, and `journal_path` for them;
- `start(...)` / `answer(...)` / `close(...)`: an engine, and a stream of work through it;
- `gather(run)`: every row's answer, on the process that writes the files (None elsewhere);
- `outcome(summaries)`: the summaries every process prints.

No placement calls back into the executor.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

from . import state
from .engines import EngineError
from .plugins import pm
from .ranks import Ranks

log = logging.getLogger(__name__)
RESTARTS = 1        # an engine that dies is restarted this many times per model
HEAD = 256          # requests prepared while the engine is still starting
SPAWN_WAIT_S = 30   # how long to wait for an engine's process to appear before going on


def generate(card, engine, requests):
    """Every request through the engine by way of the family's generate hook, as results finish."""
    cut = {}   # the requests --truncate cut: their results say so, for the report

    def noted():
        for request in requests:
            if request.truncated:
                cut[request.key] = request.truncated
            yield request

    for result in pm.hook.vlm_batch_generate(card=card, engine=engine, requests=noted()):
        result.truncated = cut.pop(result.key, None)
        if not result.ok:
            log.warning("item %s of %s failed: %s", result.index, result.dataset, result.error)
        yield result


class EngineStart:
    """An engine starting in a thread, so that loading datasets and preparing the first requests
    overlap its start; or an engine the caller already runs (then the caller closes it).

    `auto` starts vLLM where it can run the model, and transformers otherwise; `fallback` says why
    transformers ran instead (vLLM missing, no vLLM path, or vLLM's start failed and its cause)."""

    def __init__(self, card, name, options: dict, load=None):
        from . import engines

        self.card, self.options = card, options
        self.owned = isinstance(name, str)
        self.asked = name if self.owned else name.name
        self.name, self.fallback = engines.choose(card, self.asked) if self.owned else (self.asked, None)
        if self.fallback:
            log.info("%s runs on transformers: %s", card.name, self.fallback)
        self.began = time.time()
        self.engine, self.error, self.ready_at = (None if self.owned else name), None, None
        self.closed_at = None
        self._abandoned = False
        self._load = load or engines.load_engine
        if not self.owned:
            self.ready_at = self.began
            self._thread = None
            return
        try:
            spawns = engines.preload(self.name, options.get("verbose", False))
        except Exception:   # the start itself will fail, and say why
            spawns = False
        before = {p.pid for p in multiprocessing.active_children()}
        self._thread = threading.Thread(target=self._run, name="vlm-batch-engine-start", daemon=True)
        self._thread.start()
        # Until the engine's own process exists, other threads' imports would hold up its start (they
        # share import locks); once it runs on its own, this process is free to load the datasets.
        deadline = time.time() + SPAWN_WAIT_S
        while spawns and self._thread.is_alive() and time.time() < deadline and \
                not {p.pid for p in multiprocessing.active_children()} - before:
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            self.engine = self._start()
        except (EngineError, KeyboardInterrupt, SystemExit) as exc:   # handed to whoever waits for it
            self.error = exc
        except BaseException as exc:   # vLLM's or transformers' own error: this model cannot run
            error = EngineError(f"the {self.name} engine could not start: {_first_line(exc)}")
            error.__cause__ = exc
            self.error = error
        finally:
            self.ready_at = time.time()
            if self._abandoned and self.engine is not None:
                self.engine.close()

    def _start(self):
        try:
            return self._load(self.name, self.card, **self.options)
        except Exception as exc:
            if self.asked != "auto" or self.name != "vllm" or "hf" not in self.card.engines \
                    or self.options.get("tensor_parallel_size", 1) > 1:
                raise
            cause = _first_line(exc.__cause__ if isinstance(exc, EngineError) and exc.__cause__ else exc)
            self.name, self.fallback = "hf", f"vLLM's start failed: {cause}"
            log.warning("%s: vLLM could not start it (%s); running it on transformers", self.card.name, cause)
            return self._load("hf", self.card, **self.options)

    def ready(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def describe(self) -> tuple:
        """(the engine's name, its settings and counters), or (None, {}) when none ran."""
        from .engines import engine_stats

        return (self.engine.name, engine_stats(self.engine)) if self.engine is not None else (None, {})

    def get(self):
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.engine

    @property
    def start_s(self) -> float:
        return (self.ready_at or time.time()) - self.began

    def close(self) -> None:
        if not self.owned:
            return
        if not self.ready():   # interrupted while starting: close it as soon as it is up
            self._abandoned = True
            return
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
            self.closed_at = time.time()

    def times(self) -> dict:
        """When the engine began starting, was up and was closed (epoch seconds), for the suite report."""
        return {"began_at": self.began, "ready_at": self.ready_at, "closed_at": self.closed_at,
                "start_s": round(self.start_s, 3) if self.ready_at else None}

    def restart(self) -> None:
        self.close()
        self.began, self.error, self.ready_at = time.time(), None, None
        self._run()


class Local:
    """One process: every row, one engine, this process writes and scores."""

    name = "one process"
    ranks = Ranks()
    writer = True        # this process writes the files and scores

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def share(self, n: int):
        return range(n)

    def journal_path(self, work_dir: str, model: str, dataset: str) -> str:
        return state.journal_path(work_dir, model, dataset)

    def first(self, step: str, action):
        """`action` on every process (under ranks: rank 0 first, e.g. a download happens once)."""
        return action()

    def on_writer(self, step: str, action):
        """`action` on the process that writes; the others learn whether it failed."""
        return action()

    def preparer(self, card, datasets: dict, workers: int = 0, fit=None):
        from .prepare import Preparer

        return Preparer(card, datasets, workers, fit)

    def start(self, card, engine, options: dict) -> EngineStart:
        from . import engines

        return EngineStart(card, engine, options, load=engines.load_engine)

    def answer(self, card, start: EngineStart, preparer, work, on_restart=None):
        """Results for `work` ((dataset, position) pairs, in order), as they finish; rows that cannot
        be prepared come back as failed Results. An engine that dies is restarted once and gets the
        rows taken but not yet answered."""
        failures: list = []
        taken: dict = {}                  # request key -> work item, handed to the engine, unanswered
        source = iter(work)
        redo: list = []
        restarts = 0

        def requests(items):
            for request in preparer.requests(failures, items):
                taken[request.key] = (request.dataset, request.position)
                yield request

        while True:
            stream = requests(_chain(redo, source))
            head = []
            while not start.ready() and len(head) < HEAD:   # prepare while the engine starts
                request = next(stream, None)
                if request is None:
                    break
                head.append(request)
            engine = start.get()
            try:
                for result in generate(card, engine, _chain(head, stream)):
                    while failures:
                        yield failures.pop(0)
                    taken.pop(result.key, None)
                    yield result
                while failures:
                    yield failures.pop(0)
                return
            except EngineError as exc:
                if not start.owned or restarts >= RESTARTS:
                    raise
                restarts += 1
                redo = list(taken.values())
                taken.clear()
                log.error("%s; restarting the engine for the %d rows in flight", exc, len(redo))
                if on_restart:
                    on_restart(exc)
                start.restart()

    def model_failed(self, exc: BaseException) -> None:
        """A model could not run here; one process goes on with the next model."""

    def gather(self, run) -> dict:
        return {k: r.prediction for k, r in run.results.items()}

    def outcome(self, summaries: list) -> list:
        return summaries


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _chain(first, rest):
    yield from first
    yield from rest


