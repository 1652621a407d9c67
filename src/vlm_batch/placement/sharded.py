"""torchrun ranks as a placement, with VLMEvalKit's files and its order of steps.

Each rank answers rows `range(rank, n, world_size)` of every dataset with its own engine (journaled in
its own file), writes VLMEvalKit's rank file `{rank}{world_size}_{dataset}.pkl` as soon as its share
of a dataset is in, and says so with its counts; rank 0 then merges that dataset's rank files into the
prediction file, drops the run's state and scores it, while every rank goes on generating. At the
end rank 0 sends the whole suite's summaries, which every rank prints. `infer_data_job` does the same
around its barriers, so a run either tool left half-done resumes in the other.
"""

from __future__ import annotations

import logging
import os

from .. import state
from ..report import RunSummary
from ..vlmeval import files
from .base import Placement
from .ranks import Group, RankError, Ranks, assign_devices

log = logging.getLogger(__name__)
EXIT_WAIT_S = 60   # how long rank 0 keeps the store up for the others to read the outcome


def merge_shares(summary: RunSummary, shares: list[RunSummary]) -> RunSummary:
    """The whole run's counts from each rank's; generation time is the slowest rank's (they run at once)."""
    summary.engine = next((s.engine for s in shares if s.engine), None)
    summary.engine_fallback = next((s.engine_fallback for s in shares if s.engine_fallback), None)
    for count in ("generated", "resumed", "restarts", "output_tokens", "truncated"):
        setattr(summary, count, sum(getattr(s, count) for s in shares))
    summary.failed = {i: cause for s in shares for i, cause in s.failed.items()}
    summary.infer_s = max(s.infer_s for s in shares)
    summary.engine_stats = dict(shares[0].engine_stats, ranks=[
        {"rank": r, "generated": s.generated, "resumed": s.resumed, "failed": len(s.failed),
         "infer_s": round(s.infer_s, 3), "restarts": s.restarts} for r, s in enumerate(shares)])
    return summary


class RankPlacement(Placement):
    """This rank's rows, its own engine on its own GPUs; rank 0 writes and scores."""

    name = "torchrun ranks"

    def __init__(self, ranks: Ranks, tp: int = 1):
        self.ranks, self.tp = ranks, tp
        self.group = Group(ranks)

    @property
    def writer(self) -> bool:
        return self.ranks.rank == 0

    def __enter__(self):
        assign_devices(self.ranks, self.tp)   # before anything starts CUDA
        self.group.__enter__()
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None:
            self.group.announce("failed", error=exc)
        self.group.__exit__(kind, exc, tb)
        return None

    def share(self, n: int):
        return self.ranks.positions(n)

    def journal_path(self, work_dir: str, model: str, dataset: str) -> str:
        return state.journal_path(work_dir, model, dataset, self.ranks)

    def first(self, step: str, action):
        return self.group.first(step, action)

    def on_writer(self, step: str, action):
        if self.ranks.rank == 0:
            return self.group.first(step, action)
        self.group.wait(step, ranks=[0])
        return None

    def model_failed(self, exc: BaseException) -> None:
        raise exc   # the other ranks would wait for this rank's rows: the run stops, naming it

    def gather(self, run):
        """This rank's share as VLMEvalKit's rank file; on rank 0, every rank's, merged."""
        s, summary = run.summary, run.summary
        path = files.rank_file(os.path.dirname(os.path.dirname(s.prediction_file)), s.model, run.name,
                                self.ranks.rank, self.ranks.world_size)
        written = files.write_rank_file(run.dataset, run.positions,
                                         {i: r.prediction for i, r in run.results.items()}, path)
        log.info("%s wrote %s (%d items)", self.ranks, os.path.basename(written), len(run.positions))
        step = f"{summary.model}/{run.name}/infer"
        self.group.announce(step, summary.message())
        if self.ranks.rank != 0:
            return None
        merge_shares(summary, [RunSummary.from_message(m) for m in self.group.wait(step)])
        work_dir = os.path.dirname(os.path.dirname(s.prediction_file))
        return files.merge_rank_files(run.dataset, work_dir, s.model, self.ranks.world_size)

    def outcome(self, summaries: list) -> list:
        """Rank 0 sends the suite's summaries; the others wait for them, then say they have them."""
        if self.ranks.rank == 0:
            self.group.announce("done", {"summaries": [s.message() for s in summaries]})
            try:
                self.group.wait("exit", ranks=range(1, self.ranks.world_size), timeout=EXIT_WAIT_S)
            except RankError as exc:
                log.warning("%s", exc)
            return summaries
        try:
            outcome = self.group.wait("done", ranks=[0])[0]
        finally:
            self.group.announce("exit")
        return [RunSummary.from_message(m) for m in outcome["summaries"]]
