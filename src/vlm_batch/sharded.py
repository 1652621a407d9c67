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

from . import state
from . import vlmeval_bridge as bridge
from .placement import Local
from .ranks import Group, RankError, Ranks, assign_devices
from .report import RunSummary

log = logging.getLogger(__name__)
EXIT_WAIT_S = 60   # how long rank 0 keeps the store up for the others to read the outcome


def shard_message(summary: RunSummary, results: dict, answers: dict) -> dict:
    """What a rank tells rank 0 about its rows of one dataset."""
    fresh = [r for i, r in results.items() if i not in answers]
    return {"engine": summary.engine, "engine_fallback": summary.engine_fallback, "generated": sum(r.ok for r in fresh), "resumed": len(answers),
            "failed": [[i, r.error] for i, r in results.items() if not r.ok], "restarts": summary.restarts,
            "infer_s": summary.infer_s, "output_tokens": sum(r.output_tokens for r in fresh),
            "engine_stats": summary.engine_stats}


def merge_shards(summary: RunSummary, shards: list[dict]) -> RunSummary:
    """The whole run's counts from each rank's; generation time is the slowest rank's (they run at once)."""
    summary.engine = next((s["engine"] for s in shards if s["engine"]), None)
    summary.engine_fallback = next((s["engine_fallback"] for s in shards if s.get("engine_fallback")), None)
    summary.generated = sum(s["generated"] for s in shards)
    summary.resumed = sum(s["resumed"] for s in shards)
    summary.failed = {i: cause for s in shards for i, cause in s["failed"]}
    summary.restarts = sum(s["restarts"] for s in shards)
    summary.infer_s = max(s["infer_s"] for s in shards)
    summary.output_tokens = sum(s["output_tokens"] for s in shards)
    summary.engine_stats = dict(shards[0]["engine_stats"], ranks=[
        {"rank": r, "generated": s["generated"], "resumed": s["resumed"], "failed": len(s["failed"]),
         "infer_s": round(s["infer_s"], 3), "restarts": s["restarts"]} for r, s in enumerate(shards)])
    return summary


def _as_message(summary: RunSummary) -> dict:
    score = summary.score
    text = score.to_string(index=False) if hasattr(score, "to_string") else (None if score is None else str(score))
    return {"model": summary.model, "dataset": summary.dataset, "engine": summary.engine,
            "engine_fallback": summary.engine_fallback, "items": summary.items,
            "generated": summary.generated, "resumed": summary.resumed,
            "failed": [[i, c] for i, c in summary.failed.items()], "restarts": summary.restarts,
            "wall_s": summary.wall_s, "infer_s": summary.infer_s, "output_tokens": summary.output_tokens,
            "prediction_file": summary.prediction_file, "report_file": summary.report_file,
            "eval_error": summary.eval_error, "score": text, "engine_stats": summary.engine_stats,
            "phases_s": summary.phases_s, "skipped": summary.skipped, "error": summary.error}


def _from_message(m: dict) -> RunSummary:
    return RunSummary(m["model"], m["dataset"], engine=m["engine"], engine_fallback=m.get("engine_fallback"), items=m["items"], generated=m["generated"],
                      resumed=m["resumed"], failed={i: c for i, c in m["failed"]}, restarts=m["restarts"],
                      wall_s=m["wall_s"], infer_s=m["infer_s"], output_tokens=m["output_tokens"],
                      prediction_file=m["prediction_file"], report_file=m["report_file"],
                      eval_error=m["eval_error"], score=m["score"], engine_stats=m["engine_stats"],
                      phases_s=m["phases_s"], skipped=m["skipped"], error=m["error"])


class RankPlacement(Local):
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
        path = bridge.rank_file(os.path.dirname(os.path.dirname(s.prediction_file)), s.model, run.name,
                                self.ranks.rank, self.ranks.world_size)
        written = bridge.write_rank_file(run.dataset, run.positions,
                                         {i: r.prediction for i, r in run.results.items()}, path)
        log.info("%s wrote %s (%d items)", self.ranks, os.path.basename(written), len(run.positions))
        step = f"{summary.model}/{run.name}/infer"
        self.group.announce(step, shard_message(summary, run.results, run.answers))
        if self.ranks.rank != 0:
            return None
        merge_shards(summary, self.group.wait(step))
        work_dir = os.path.dirname(os.path.dirname(s.prediction_file))
        return bridge.merge_rank_files(run.dataset, work_dir, s.model, self.ranks.world_size)

    def outcome(self, summaries: list) -> list:
        """Rank 0 sends the suite's summaries; the others wait for them, then say they have them."""
        if self.ranks.rank == 0:
            self.group.announce("done", {"summaries": [_as_message(s) for s in summaries]})
            try:
                self.group.wait("exit", ranks=range(1, self.ranks.world_size), timeout=EXIT_WAIT_S)
            except RankError as exc:
                log.warning("%s", exc)
            return summaries
        try:
            outcome = self.group.wait("done", ranks=[0])[0]
        finally:
            self.group.announce("exit")
        return [_from_message(m) for m in outcome["summaries"]]
