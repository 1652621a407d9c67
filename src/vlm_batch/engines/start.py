"""An engine starting in a thread, so that loading datasets and preparing the first requests overlap its
start; restarted when it dies; closed once. Where the choice allows it, a vLLM start that fails becomes
a transformers start, and `fallback` says why."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

from . import EngineError, load, preload, processes

log = logging.getLogger(__name__)
SPAWN_WAIT_S = 30   # how long to wait for an engine's process to appear before going on


class EngineStart:
    """The engine of one model, as the executor and the placements see it.

    `EngineStart(card, choice, options)` starts the chosen engine in a thread; `EngineStart.running(engine)`
    wraps an engine the caller already runs (then the caller closes it)."""

    def __init__(self, card, choice, options: dict, load_engine=None):
        self.card, self.options, self.choice = card, options, choice
        self.owned = True
        self.name, self.fallback = choice.engine, choice.fallback
        if self.fallback:
            log.info("%s runs on transformers: %s", card.name, self.fallback)
        self.began = time.time()
        self.engine, self.error, self.ready_at, self.closed_at = None, None, None, None
        self._abandoned = False
        self._load = load_engine or load
        self._mark = processes.mark()
        try:
            spawns = preload(self.name, options.get("verbose", False))
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

    @classmethod
    def running(cls, engine) -> "EngineStart":
        start = cls.__new__(cls)
        start.card, start.options, start.choice = None, {}, None
        start.owned, start.name, start.fallback = False, engine.name, None
        start.began = start.ready_at = time.time()
        start.engine, start.error, start.closed_at, start._abandoned, start._thread = engine, None, None, False, None
        return start

    def _run(self) -> None:
        try:
            self.engine = self._start()
        except (EngineError, KeyboardInterrupt, SystemExit) as exc:   # handed to whoever waits for it
            self.error = exc
        except BaseException as exc:   # vLLM's or transformers' own error: this model cannot run
            error = EngineError(f"the {self.name} engine could not start: {first_line(exc)}")
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
            if self.name != "vllm" or not self.choice.may_fall_back(self.card, self.options):
                raise
            cause = first_line(exc.__cause__ if isinstance(exc, EngineError) and exc.__cause__ else exc)
            self.name, self.fallback = "hf", f"vLLM's start failed: {cause}"
            log.warning("%s: vLLM could not start it (%s); running it on transformers", self.card.name, cause)
            return self._load("hf", self.card, **self.options)

    def rendering(self):
        """How preparation workers may render requests for this engine (`engines.rendering`), or None:
        not vLLM, or not an engine this run starts. Asked before the engine is up; once it has fallen
        back to transformers, the workers stop rendering."""
        if not self.owned or self.name != "vllm":
            return None
        from .vllm import rendering

        try:
            return rendering(self.card, self.options, wanted=lambda: self.name == "vllm")
        except Exception as exc:   # the engine's start will say what is wrong; its process renders
            log.debug("no rendering in workers: %s", exc)
            return None

    def ready(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    @property
    def up(self) -> bool:
        """An engine runs (it may not have answered yet)."""
        return self.engine is not None

    def describe(self) -> tuple:
        """(the engine's name, its settings and counters), or (None, {}) when none ran."""
        from . import engine_stats

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
        if not self.ready():   # interrupted while starting: its process goes now, the rest once it is up
            self._abandoned = True
            for proc in processes.started_since(self._mark):
                if proc.is_alive():
                    proc.kill()
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
