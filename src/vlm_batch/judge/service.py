"""What scoring is pointed at: the judge a dataset is scored with, and the suite's one judge service."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..vlmeval.files import drop_scores
from ..vlmeval.judging import NOT_JUDGED, forget_failed, needs_llm, working
from ..vlmeval.scoring import JudgeFellBack, evaluate
from . import DEFAULT_NPROC, EXACT, JudgeError, is_local, resolve
from .metrics import Watch
from .server import JudgeServer

log = logging.getLogger(__name__)


@dataclass
class Judge:
    """The judge a dataset is scored with: its name for VLMEvalKit, where it answers, how many at once."""
    name: str                              # the model VLMEvalKit's judge asks for (the served name)
    base_url: str | None = None            # an OpenAI-compatible root ending in /v1; None: VLMEvalKit's own
    nproc: int = DEFAULT_NPROC
    model: str | None = None               # what it serves (a checkpoint or hub id), for the report
    key: str | None = None
    server: JudgeServer | None = None      # ours, when we started it
    stats: list = field(default_factory=list)

    def kwargs(self) -> dict:
        """VLMEvalKit's judge arguments (`dataset.evaluate(path, **kwargs)`), as its run.py builds them."""
        out = {"model": self.name, "nproc": self.nproc}
        if self.base_url:
            out["api_base"] = f"{self.base_url.rstrip('/')}/chat/completions"
            out["key"] = self.key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            if self.server is not None:
                out["wait"] = 0   # our own server: a failed call is a dead server, not a rate limit
        return out

    def check(self) -> None:
        """VLMEvalKit's own `working()` test of the judge, first: it would otherwise fall back to exact
        matching without a word, and cache that fallback's answers as judged."""
        if self.server is not None and not self.server.alive():
            raise JudgeError(f"the judge server for {self.model} is not running (it exited): "
                             f"{self.server.log_tail()}")
        if not working(**self.kwargs()):
            where = self.base_url or "VLMEvalKit's API"
            raise JudgeError(f"the judge {self.name} at {where} does not answer (VLMEvalKit's working() check "
                             "failed); refusing to fall back to exact matching")


def external(name: str, base_url: str, nproc: int = DEFAULT_NPROC) -> Judge:
    """A judge server the user already runs (--judge-base-url); without a name, the one it serves."""
    if not name or name == EXACT or is_local(name) and not os.path.exists(name):
        served = served_models(base_url)
        if len(served) == 1:
            name = served[0]
        elif not name or name == EXACT:
            raise JudgeError(f"{base_url} serves {served or 'no models'}; name the judge model with --judge")
    return Judge(name=name, base_url=base_url, nproc=nproc, model=name)


def served_models(base_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=10) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise JudgeError(f"the judge server at {base_url} does not answer: {exc}") from exc



def score_with(dataset, path: str, judge: Judge):
    """VLMEvalKit's `evaluate`, unchanged, pointed at `judge`; returns (score, the judge's numbers).

    A judge that is down, or a server of ours that dies while scoring, ends the scoring with a
    JudgeError: the judge caches keep every item judged before it, minus the failed calls VLMEvalKit
    cached as random picks, so `--mode eval` later judges only the rest. The predictions are untouched.
    """
    began = time.time()
    watch = Watch(judge.base_url) if judge.base_url else None   # counts our working() check too
    try:
        judge.check()
    except BaseException:
        if watch is not None:
            watch.stop()
        raise
    stats = {"model": judge.model or judge.name, "name": judge.name, "base_url": judge.base_url,
             "nproc": judge.nproc, "server_start_s": round(judge.server.started_s, 3)
             if judge.server is not None and judge.server.started_s else None}
    error = None
    try:
        kwargs = judge.kwargs()
        del kwargs["model"]
        result = evaluate(dataset, path, judge=judge.name, nproc=kwargs.pop("nproc"), strict_judge=True,
                                 **kwargs)
    except JudgeFellBack as exc:
        error, result = str(exc), None
    finally:
        elapsed = time.time() - began
        seen = watch.stop() if watch is not None else {}
    died = judge.server is not None and not judge.server.alive()
    lost = 0
    if died or error:
        lost = forget_failed(path, extra=(NOT_JUDGED,) if error else ())
        drop_scores(path)
    calls = seen.get("server_calls")
    failures = (seen.get("server_errors") or 0) + lost
    stats.update(calls=calls, failures=failures, time_s=round(elapsed, 3),
                 calls_per_s=round(calls / elapsed, 3) if calls and elapsed else None,
                 peak_running=seen.get("peak_running"), tokens_per_step=seen.get("tokens_per_step"))
    judge.stats.append(stats)
    if died and judge.server.stopped:
        raise JudgeError(f"the judge server for {judge.model} was stopped (interrupted) while scoring "
                         f"{dataset.dataset_name}: {lost} items were not judged; the judged ones are cached, the "
                         f"predictions kept in {path}: rerun with --mode eval to judge the rest", stats)
    if died:
        raise JudgeError(f"the judge server for {judge.model} died while scoring {dataset.dataset_name} "
                         f"(exit status {judge.server.proc.returncode if judge.server.proc else '?'}): "
                         f"{lost} items were not judged; the judged ones are cached, the predictions kept in "
                         f"{path}: rerun with --mode eval to judge the rest. {judge.server.log_tail(2)}", stats)
    if error:
        raise JudgeError(f"{error}; {lost} items were not judged; rerun with --mode eval", stats)
    return result, stats


class JudgeService:
    """The suite's judge, resolved once: one server for every dataset that needs an LLM judge, started
    when the first one does (on a GPU, once the evaluated model's engine is released), stopped at the end."""

    def __init__(self, name: str = EXACT, *, base_url: str | None = None, nproc: int = DEFAULT_NPROC,
                 trust_remote_code: bool = False, serve_args: list[str] | None = None, share_gpu: bool = False):
        self.name, self.base_url, self.nproc = name, base_url, nproc
        self.trust_remote_code, self.serve_args = trust_remote_code, serve_args
        self.local = base_url is None and is_local(name)
        self.judge: Judge | None = None
        self.server: JudgeServer | None = None
        self.error: JudgeError | None = None
        self._lock = threading.Lock()
        self.engine_free = threading.Event()
        self.engine_free.set()
        self.share_gpu = share_gpu

    def scores(self, dataset) -> bool:
        """Whether this dataset's scoring goes through the suite's judge (ours or --judge-base-url)."""
        return (self.local or self.base_url is not None) and needs_llm(dataset)

    def waits_for_engine(self, dataset) -> bool:
        """Its scoring would wait for the GPU the evaluated model's engine holds: put it off, so the
        datasets behind it are written and rule-scored meanwhile."""
        return self.local and not self.engine_free.is_set() and needs_llm(dataset)

    def engine_started(self) -> None:
        """The evaluated model's engine is about to take the GPU: a local judge that needs it waits (see
        `get`). One left from the previous model (its scoring is over by now) is stopped first, and
        started again when a dataset of this model needs it."""
        from ..engines import on_gpu

        if self.local and on_gpu() and not self.share_gpu:
            with self._lock:
                if self.server is not None:
                    self.server.close()
                    self.server = self.judge = None
                self.engine_free.clear()

    def engine_released(self) -> None:
        self.engine_free.set()

    def get(self) -> Judge:
        """The judge, its server started on first use; a failed start fails every later use alike."""
        with self._lock:
            if self.judge is not None:
                return self.judge
            if self.error is not None:
                raise self.error
            try:
                if self.base_url:
                    self.judge = external(self.name, self.base_url, self.nproc)
                elif self.local:
                    self.engine_free.wait()
                    model = resolve(self.name)
                    self.server = JudgeServer(model, served_name=Path(self.name).name or self.name,
                                              trust_remote_code=self.trust_remote_code,
                                              extra_args=self.serve_args).start()
                    self.judge = Judge(name=self.server.served_name, base_url=self.server.base_url,
                                       nproc=self.nproc, model=self.name, server=self.server)
                else:
                    self.judge = Judge(name=self.name, nproc=self.nproc, model=self.name)
            except JudgeError as exc:
                self.error = exc
                raise
            return self.judge

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
