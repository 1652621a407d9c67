"""One model on one dataset: a suite of one. The library call behind `vlm-batch eval --model M --dataset D`.

    row -> prompt -> request -> engine -> prediction -> journal -> file -> score

(see `executor` for the line itself, `suite` for several models and datasets).
"""

from __future__ import annotations

from .engines import EngineError
from .plan import DatasetSpec, ModelSpec, Plan, PlanError, _dataset_problems
from .report import RunSummary
from .settings import Settings
from .vlmeval import DatasetError


def run_eval(card, dataset_name: str, *, engine="vllm", kind: str | None = None, started: float | None = None,
             **settings) -> RunSummary:
    """`engine` is an engine name, or an engine already running (the caller then closes it); `settings`
    are `Settings` fields (work_dir, mode, limit, judge, batch_size, prep_workers, ray, ...).

    Under torchrun (RANK and WORLD_SIZE set) each rank answers its stride of rows and rank 0 merges
    and scores; with `ray` (a placement.ray.RayOptions) replicas on a Ray cluster answer and this
    process writes and scores. Raises EngineError when the engine could not run.
    """
    from .placement import placement_for
    from .placement.ranks import Ranks
    from .suite import run_suite

    settings = Settings(**settings)
    placement = placement_for(Ranks.from_env(), settings.ray, settings.tp)
    if not isinstance(engine, str) and placement.name != "one process":
        raise EngineError("ranks and Ray replicas start their own engines: pass an engine name")
    plan = Plan([ModelSpec(card, engine)], [DatasetSpec(dataset_name, kind)])
    problems = _dataset_problems(plan.datasets)
    if problems:
        raise DatasetError("; ".join(problems))
    try:
        result = run_suite(plan, settings, started=started, placement=placement)
    except PlanError as exc:
        raise EngineError(str(exc)) from exc
    if result.failed_models:
        raise EngineError(result.failed_models[0]["error"])
    return result.summaries[0]
