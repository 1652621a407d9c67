"""A suite: every model of the plan, one after another, each over every dataset through one engine.

    plan (names checked) -> placement (chosen once) -> per model: Executor.run -> summaries
      -> summary.csv / summary.json / suite_report.json, and the table the CLI prints

A model whose engine cannot start is reported and the next model runs; its engine is fully
closed, and the memory it held returned, before the next one starts.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

from . import ending, report
from .engines import EngineError
from .executor import Executor
from .plan import Plan
from .placement import placement_for
from .placement.ranks import Ranks
from .report import RunSummary
from .state import Locked
from .timeline import Timeline
from .vlmeval.datasets import load_dataset
from .writes import WriteError

log = logging.getLogger(__name__)


@dataclass
class SuiteResult:
    summaries: list[RunSummary] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)     # per model: engine, phases, memory, error
    report_file: str | None = None
    ended: dict = field(default_factory=dict)             # how the run ended (see `ending.ended`)

    @property
    def failed_models(self) -> list[dict]:
        return [m for m in self.models if m.get("error")]


def run(settings, *, started: float | None = None, progress: bool = False) -> SuiteResult:
    """The suite the settings name: its plan built, every name and each model's engine checked before
    anything loads (a PlanError or DatasetError says what is wrong), then run; a progress bar if asked."""
    from .plan import build
    from .progress import SuiteProgress

    bar = SuiteProgress() if progress else None
    try:
        return run_suite(build(settings), settings, started=started, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def run_suite(plan: Plan, settings, *, started: float | None = None, progress=None,
              placement=None) -> SuiteResult:
    """Every model over every dataset. `started`: when the run began (the process start, for the CLI).

    Each model's engine is decided first, before anything loads (a PlanError names every problem)."""
    options = settings.engine_options()
    if settings.mode != "eval":
        plan.decide_engines(options)
    placement = placement or placement_for(Ranks.from_env(), settings.ray, settings.tp)
    result = SuiteResult()
    loaded: dict = {}
    kinds = {d.name: d.kind for d in plan.datasets}

    def dataset(name: str):
        if name not in loaded:
            loaded[name] = load_dataset(name, settings.limit, kinds.get(name))
        return loaded[name]

    began = time.time() if started is None else started
    timeline = Timeline(began)
    timeline.mark("imports")
    from .judge.service import JudgeService

    judges = JudgeService(settings.judge, base_url=settings.judge_base_url, nproc=settings.judge_nproc,
                          trust_remote_code=settings.trust_remote_code,
                          share_gpu=settings.judge_gpu_share is not None,
                          serve_args=(["--gpu-memory-utilization", str(settings.judge_gpu_share)]
                                      if settings.judge_gpu_share is not None else None))
    error = None
    try:
        with placement, judges:   # the judge server, if one started, is stopped on every way out
            _models(plan, settings, options, placement, Executor(placement, settings, dataset, judges, progress),
                    timeline, result)
            result.summaries = placement.outcome(result.summaries)
    except BaseException as exc:
        error = exc
        raise
    finally:
        result.ended = ending.ended(error, result.failed_models, len(plan.models))
        if placement.writer and not isinstance(error, Locked) and (
                error is not None or len(plan.models) > 1 or len(plan.datasets) > 1 or settings.mode != "eval"):
            _write_suite(settings.work_dir, result, began, error)
    return result


def _models(plan, settings, options, placement, executor, timeline, result) -> None:
    """Every model of the plan, one after another, each over every dataset through one engine."""
    for spec in plan.models:
        if len(result.models):
            timeline = Timeline()
        model = {"model": spec.card.name, "engine_asked": spec.engine if not spec.running else spec.engine.name}
        try:
            summaries = executor.run(spec, plan.names, {**options, **spec.options}, timeline)
        except EngineError as exc:
            placement.model_failed(exc)
            log.error("%s: %s", spec.card.name, exc)
            model["error"] = str(exc)
            summaries = [RunSummary(spec.card.name, n, error=str(exc)) for n in plan.names]
        finally:
            gc.collect()
            _return_memory()
        model.update(engine_times=executor.engine_times, phases_s=timeline.rounded(), wall_s=round(timeline.wall, 3),
                     rss_after_close_mb=_rss_mb(), engine=next((s.engine for s in summaries if s.engine), None),
                     engine_fallback=next((s.engine_fallback for s in summaries if s.engine_fallback), None))
        for s in summaries:
            if not s.skipped and not s.error:
                s.phases_s, s.wall_s = timeline.rounded(), timeline.wall
                if s.report_file and placement.writer:
                    report.write_run_report(s, spec.card)
        result.models.append(model)
        result.summaries.extend(summaries)


def _write_suite(work_dir: str, result: SuiteResult, began: float, error: BaseException | None) -> None:
    """The suite report, also when the run was interrupted or failed (then it says so, and what it has)."""
    import os

    try:
        report.write_suite(work_dir, result.summaries, result.models, began, result.ended)
    except WriteError as exc:
        if error is None:
            raise
        log.debug("the suite report could not be written either: %s", exc)   # the first error says why
        return
    result.report_file = os.path.join(work_dir, "suite_report.json")


def _rss_mb() -> float:
    """This process's resident memory and its children's (vLLM's engine core), after a model's close."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def _return_memory() -> None:
    """Hand freed heap back to the system, so the next model starts with what the last one released."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
