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

from . import report
from . import vlmeval_bridge as bridge
from .engines import EngineError, check_choice
from .executor import Executor, Settings
from .plan import Plan, PlanError
from .ranks import RankError, Ranks
from .report import RunSummary
from .timeline import Timeline

log = logging.getLogger(__name__)


@dataclass
class SuiteResult:
    summaries: list[RunSummary] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)     # per model: engine, phases, memory, error
    report_file: str | None = None

    @property
    def failed_models(self) -> list[dict]:
        return [m for m in self.models if m.get("error")]


def placement_for(ranks: Ranks, ray=None, tp: int = 1):
    """Where this run happens, decided once: Ray replicas, torchrun ranks, or this process."""
    if ray is not None:
        if ranks.distributed:
            raise RankError(f"{ranks}: --ray starts its own replicas; run it as one process, not under torchrun")
        from .ray_runner import RayPlacement

        return RayPlacement(ray)
    if ranks.distributed:
        from .sharded import RankPlacement

        return RankPlacement(ranks, tp)
    from .placement import Local

    return Local()


def engine_options(engine: str, options: dict | None, tp: int = 1) -> dict:
    """The options an engine is started with; `tp` GPUs per engine need vLLM (tensor parallel)."""
    options = dict(options or {})
    if tp > 1:
        if engine == "hf":
            raise PlanError(f"--tp {tp} splits one model across GPUs, which only the vllm engine does; "
                            f"the hf engine runs one model per GPU (use more ranks or replicas)")
        options["tensor_parallel_size"] = tp
    return options


def check_engines(plan: Plan, options: dict, mode: str, tp: int = 1) -> None:
    """Before any model loads: each model has the engine asked for, and remote code is opted into."""
    if mode == "eval":
        return
    problems = []
    for spec in plan.models:
        if not isinstance(spec.engine, str):
            continue
        try:
            engine_options(spec.engine, options, tp)
            check_choice(spec.card, spec.engine, options.get("trust_remote_code", False))
        except (EngineError, PlanError) as exc:
            problems.append(str(exc))
    if problems:
        raise PlanError("; ".join(problems))


def run_suite(plan: Plan, settings: Settings, *, options: dict | None = None, limit: int | None = None,
              tp: int = 1, ray=None, started: float | None = None, progress=None,
              placement=None) -> SuiteResult:
    """Every model over every dataset. `started`: when the run began (the process start, for the CLI)."""
    options = dict(options or {})
    placement = placement or placement_for(Ranks.from_env(), ray, tp)
    result = SuiteResult()
    loaded: dict = {}
    kinds = {d.name: d.kind for d in plan.datasets}

    def dataset(name: str):
        if name not in loaded:
            loaded[name] = bridge.load_dataset(name, limit, kinds.get(name))
        return loaded[name]

    began = time.time() if started is None else started
    timeline = Timeline(began)
    timeline.mark("imports")
    from .judge import JudgeService

    judges = JudgeService(settings.judge, base_url=settings.judge_base_url, nproc=settings.judge_nproc,
                          trust_remote_code=settings.trust_remote_code,
                          share_gpu=settings.judge_gpu_share is not None,
                          serve_args=(["--gpu-memory-utilization", str(settings.judge_gpu_share)]
                                      if settings.judge_gpu_share is not None else None))
    with placement, judges:   # the judge server, if one started, is stopped on every way out
        executor = Executor(placement, settings, dataset, progress)
        executor.judges = judges
        for spec in plan.models:
            if len(result.models):
                timeline = Timeline()
            model = {"model": spec.card.name, "engine_asked": spec.engine if isinstance(spec.engine, str)
                     else spec.engine.name}
            try:
                opts = engine_options(spec.engine, {**options, **spec.options}, tp) \
                    if isinstance(spec.engine, str) else dict(options)
                summaries = executor.run(spec.card, plan.names, spec.engine, opts, timeline)
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
        result.summaries = placement.outcome(result.summaries)
    if placement.writer and (len(plan.models) > 1 or len(plan.datasets) > 1 or settings.mode != "eval"):
        report.write_suite(settings.work_dir, result.summaries, result.models, began)
        import os

        result.report_file = os.path.join(settings.work_dir, "suite_report.json")
    return result


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
