"""Ray replicas as a placement: Ray Data streams the rows through CPU tasks and a pool of engine replicas.

    (dataset, position) -> prepare (CPU tasks: prompt, image decoding, plugin `prepare`)
              -> Replica actors (N of them, each its own vLLM or transformers engine, K GPUs each)
              -> this process, which journals every result as it arrives

The driver keeps the same journals as a single-process run, so an interrupted run resumes either
way, and writes VLMEvalKit's files itself, each dataset as soon as its rows are in. A replica that dies is restarted by Ray Data and its
batch retried; answers seen twice are kept once, and rows that never came back are sent again.

Ray is an optional extra (`vlm-batch[ray]`): only this module imports it, and only when called.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

from ..engines import EngineError
from ..request import Result
from .base import Placement
from .ray_workers import Replica, prepare_batch

log = logging.getLogger(__name__)
PREP_ROWS = 8        # rows per preparation task
PREP_CPUS = 0.5      # a preparation task is light Python work: two share a core
# Engines meet more requests at once in bigger batches; the driver still journals every RESULT_ROWS.
BATCH_ROWS = {"vllm": 256, "hf": 32}
# What replicas need from the driver's environment when they run on other nodes or a started cluster.
FORWARDED_ENV = ("LMUData", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VLM_BATCH_HOME",
                 "VLM_BATCH_PLUGINS")


class RayRunError(EngineError):
    """The Ray cluster could not be used, or rows stayed unanswered."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None          # a running cluster ("auto", "ray://host:10001"); None: start one here
    replicas: int = 1
    gpus_per_replica: float | None = None   # None: the engine's tensor-parallel size on GPU machines, else 0
    batch_rows: int | None = None       # rows a replica takes at a time; None: per engine
    resubmits: int = 2                  # passes over rows that no replica answered


def plan_cpus(cluster_cpus: float, replicas: int) -> tuple[float, float]:
    """(CPUs per replica, CPUs per preparation task).

    A replica takes one CPU where the cluster has room for every replica and a preparation task
    besides, otherwise an equal share of what is left after one preparation task (Ray counts CPUs
    in ten-thousandths: shares are rounded down so they never add up to more than the cluster has).
    The two amounts differ on purpose: Ray Data fuses stages that ask for the same resources, and
    preparation must stay in CPU tasks beside the replicas, not inside them.
    """
    if replicas < 1:
        raise ValueError("at least one replica")
    if cluster_cpus >= replicas + PREP_CPUS:
        return 1.0, PREP_CPUS
    share = math.floor((cluster_cpus - PREP_CPUS) / replicas * 100) / 100
    if share <= 0:
        raise RayRunError(f"the Ray cluster has {cluster_cpus:g} CPUs: too few for {replicas} replicas and "
                          "the preparation tasks; lower --replicas or add CPUs")
    return (share - 0.01 if share == PREP_CPUS else share), PREP_CPUS


def connect(address: str | None, verbose: bool = False):
    """Ray, connected: to `address`, to the cluster this process already joined, or a new local one."""
    try:
        import ray
    except ImportError as exc:
        raise RayRunError("--ray needs Ray Data: pip install 'vlm-batch[ray]'") from exc
    if not ray.is_initialized():
        if address is None:   # a cluster of our own: its processes go when we do, however we go
            from ..engines.reaper import start_for_this_process

            start_for_this_process()
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose,
                     include_dashboard=False)
        except Exception as exc:
            raise RayRunError(f"could not reach a Ray cluster at {address or 'a new local cluster'}: "
                              f"{type(exc).__name__}: {exc}") from exc
    return ray


def root_cause(exc: BaseException) -> str:
    """The error the remote code raised: the last one its traceback names (Ray wraps it in its own
    error, with every frame of the chain)."""
    import re

    text = str(exc)
    found = re.findall(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt)): (.+)$", text, re.M)
    if found:
        name, message = found[-1]
        return f"{name}: {message.strip()}"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _result(row) -> Result:
    error = str(row["error"]) or None
    return Result(index=json.loads(row["index"]), text=None if error else str(row["text"]), error=error,
                  prompt_tokens=int(row["prompt_tokens"]), output_tokens=int(row["output_tokens"]),
                  dataset=str(row["dataset"]), truncated=tuple(json.loads(row["truncated"]) or ()) or None)


# -- the driver ------------------------------------------------------------------------------------

class ReplicaStart:
    """Where a single-process run has its engine start: what the replicas reported about themselves."""

    owned = True

    def __init__(self, choice, options: RayOptions, engine_options: dict):
        self.choice, self.options, self.engine_options = choice, options, engine_options
        self.name, self.fallback = choice.engine, choice.fallback
        self.began, self.ready_at = time.time(), None
        self.stats: dict = {}

    def describe(self) -> tuple:
        return self.name, {"ray": self.stats}

    def close(self) -> None:
        """The replicas' engines go with the Ray pipeline that ran them."""

    def times(self) -> dict:
        return {"began_at": self.began, "ready_at": self.ready_at, "closed_at": None, "start_s": None}


class _Datasets:
    """What the executor hands a local preparer; the rows are prepared by Ray tasks instead."""

    def __init__(self, datasets: dict, fit=None):
        self.datasets, self.fit = datasets, fit

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class RayPlacement(Placement):
    """Every row, answered by replicas on a Ray cluster; this process journals, writes and scores."""

    name = "Ray replicas"

    def __init__(self, options: RayOptions):
        self.options = options
        self._started = False

    def __enter__(self):
        import ray

        self._started = not ray.is_initialized()
        return self

    def __exit__(self, *exc):
        import ray

        if self._started and ray.is_initialized():   # a local cluster we started: its processes go with us
            ray.shutdown()
        return None

    def start(self, card, choice, options: dict) -> ReplicaStart:
        return ReplicaStart(choice, self.options, options)

    def preparer(self, card, datasets: dict, workers: int = 0, fit=None, start=None) -> _Datasets:
        return _Datasets(datasets, fit)

    def answer(self, card, start: ReplicaStart, preparer: _Datasets, work, on_restart=None):
        """Results for `work` ((dataset, position) pairs) from the replicas, each row once."""
        from ..engines import on_gpu

        opts, engine_options = self.options, start.engine_options
        verbose = engine_options.get("verbose", False)
        connect(opts.address, verbose)
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = context.print_on_execution_start = verbose   # ours, unless -v
        todo = list(work)
        gpus = opts.gpus_per_replica
        if gpus is None:
            gpus = engine_options.get("tensor_parallel_size", 1) if on_gpu() else 0
        replica_cpus, prep_cpus = plan_cpus(ray.cluster_resources().get("CPU", 0), opts.replicas)
        batch_rows = opts.batch_rows or BATCH_ROWS.get(start.name, 32)
        card.path()   # a tiny local checkpoint is built here once, not by every replica at the same time
        refs = {name: ray.put(d) for name, d in preparer.datasets.items()}
        seen: dict[str, int] = {}          # replica -> items it answered
        preparers: set = set()
        answered: set = set()
        duplicates, resubmitted, engine_restarts = 0, 0, {}
        t0 = time.time()
        try:
            for attempt in range(1 + opts.resubmits):
                if not todo:
                    break
                if attempt:
                    resubmitted += len(todo)
                    log.warning("%d items came back from no replica; sending them again", len(todo))
                rows = ray.data.from_items([{"dataset": n, "position": p} for n, p in todo])
                prepared = rows.map_batches(prepare_batch, fn_kwargs={"card": card, "dataset_refs": refs,
                                                                           "fit": preparer.fit},
                                            batch_size=PREP_ROWS, num_cpus=prep_cpus)
                results = prepared.map_batches(
                    Replica, fn_constructor_kwargs={"card": card, "choice": start.choice,
                                                    "engine_options": engine_options},
                    compute=ray.data.ActorPoolStrategy(size=opts.replicas), batch_size=batch_rows,
                    num_cpus=replica_cpus, num_gpus=gpus or None)
                try:
                    for row in results.iter_rows():
                        result = _result(row)
                        if (result.dataset, int(row["position"])) in answered:
                            duplicates += 1   # a retried batch answered it again: the first answer stands
                            continue
                        answered.add((result.dataset, int(row["position"])))
                        seen[row["replica"]] = seen.get(row["replica"], 0) + 1
                        engine_restarts[row["replica"]] = int(row["restarts"])
                        start.name = row["engine"]
                        preparers.add(str(row["prepared_by"]))
                        ready = float(row["ready_at"])
                        start.ready_at = min(start.ready_at or ready, ready)
                        yield result
                except Exception as exc:
                    log.debug("the Ray pipeline failed: %s", exc)
                    raise RayRunError(f"the Ray pipeline failed: {root_cause(exc)}") from exc
                todo = [w for w in todo if w not in answered]
        finally:
            start.stats = {"replicas": opts.replicas, "gpus_per_replica": gpus, "cpus_per_replica": replica_cpus,
                           "batch_rows": batch_rows, "answered_by": seen, "prepared_by": sorted(preparers),
                           "duplicates": duplicates, "resubmitted": resubmitted,
                           "engine_restarts": sum(engine_restarts.values()),
                           # a replica process that died and was restarted comes back with a new id
                           "replicas_restarted": max(0, len(seen) - opts.replicas),
                           "pipeline_s": round(time.time() - t0, 3)}   # replicas' start-up included
        if todo:
            raise RayRunError(f"items {todo[:10]} got no answer from any replica after "
                              f"{opts.resubmits} resubmissions; the others are saved, rerun to resume")
