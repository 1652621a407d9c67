"""One model on one dataset: a suite of one. The library call behind `vlm-batch eval --model M --dataset D`.

    row -> prompt -> request -> engine -> prediction -> journal -> file -> score

(see `executor` for the line itself, `suite` for several models and datasets).
"""

from __future__ import annotations

from . import vlmeval_bridge as bridge
from .engines import EngineError
from .executor import Settings
from .plan import DatasetSpec, ModelSpec, Plan, PlanError
from .prepare import PluginError, build_requests, decode_images, prepare, prepare_row   # noqa: F401  (row -> request)
from .report import RunSummary   # noqa: F401
from .state import journal_path, load_progress   # noqa: F401


def run_eval(card, dataset_name: str, *, work_dir: str = "./outputs", mode: str = "all",
             judge: str = bridge.DEFAULT_JUDGE, engine="vllm", limit: int | None = None,
             engine_options: dict | None = None, nproc: int = 4, prep_workers: int = 0, tp: int = 1,
             ray=None, kind: str | None = None, rerun: bool = False, wait: bool = False,
             started: float | None = None) -> RunSummary:
    """`engine` is an engine name, or an engine already running (the caller then closes it).

    Under torchrun (RANK and WORLD_SIZE set) each rank answers its stride of rows and rank 0 merges
    and scores; with `ray` (a ray_runner.RayOptions) replicas on a Ray cluster answer and this
    process writes and scores. Raises EngineError when the engine could not run.
    """
    from .plan import _dataset_problems
    from .ranks import Ranks
    from .suite import check_engines, placement_for, run_suite

    placement = placement_for(Ranks.from_env(), ray, tp)
    if not isinstance(engine, str) and placement.name != "one process":
        raise PluginError("ranks and Ray replicas start their own engines: pass an engine name")
    plan = Plan([ModelSpec(card, engine)], [DatasetSpec(dataset_name, kind)])
    problems = _dataset_problems(plan.datasets)
    if problems:
        raise bridge.DatasetError("; ".join(problems))
    options = dict(engine_options or {})
    try:
        check_engines(plan, options, mode, tp)
    except PlanError as exc:
        raise EngineError(str(exc)) from exc
    settings = Settings(work_dir=work_dir, mode=mode, judge=judge, nproc=nproc, prep_workers=prep_workers,
                        rerun=rerun, wait=wait, verbose=options.get("verbose", False))
    result = run_suite(plan, settings, options=options, limit=limit, tp=tp, ray=ray, started=started,
                       placement=placement)
    if result.failed_models:
        raise EngineError(result.failed_models[0]["error"])
    return result.summaries[0]
