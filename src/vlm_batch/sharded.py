"""One evaluation split across torchrun's ranks, with VLMEvalKit's files and its order of steps.

Each rank answers rows `range(rank, n, world_size)` with its own engine (journaled in its own file),
writes VLMEvalKit's rank file `{rank}{world_size}_{dataset}.pkl` and reports its counts; rank 0
then merges the rank files into the prediction file, drops the run's state, scores and reports a
summary of the whole run, which every rank prints. `infer_data_job` does the same around its
barriers, so a run either tool left half-done resumes in the other.
"""

from __future__ import annotations

import logging
import os
import time

from . import vlmeval_bridge as bridge
from .ranks import Group, RankError, Ranks, assign_devices
from .runner import RunSummary, finish, forget_state, infer, journal_path, score

log = logging.getLogger(__name__)
EXIT_WAIT_S = 60   # how long rank 0 keeps the store up for the others to read the outcome


def shard_message(summary: RunSummary) -> dict:
    """What a rank tells rank 0 about its rows."""
    return {"engine": summary.engine, "generated": summary.generated, "resumed": summary.resumed,
            "failed": [[i, cause] for i, cause in summary.failed.items()], "restarts": summary.restarts,
            "infer_s": summary.infer_s, "output_tokens": summary.output_tokens,
            "engine_stats": summary.engine_stats}


def merge_shards(summary: RunSummary, shards: list[dict]) -> RunSummary:
    """The whole run's counts from each rank's; generation time is the slowest rank's (they run at once)."""
    summary.engine = next((s["engine"] for s in shards if s["engine"]), None)
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


def outcome_message(summary: RunSummary) -> dict:
    """Rank 0's summary of the run, for the other ranks to print."""
    score = summary.score
    text = score.to_string(index=False) if hasattr(score, "to_string") else (None if score is None else str(score))
    return {"summary": {**shard_message(summary), "items": summary.items, "wall_s": summary.wall_s,
                        "prediction_file": summary.prediction_file, "report_file": summary.report_file,
                        "eval_error": summary.eval_error, "score": text}}


def summary_from_message(model: str, dataset: str, message: dict) -> RunSummary:
    s = message["summary"]
    return RunSummary(model, dataset, engine=s["engine"], items=s["items"], generated=s["generated"],
                      resumed=s["resumed"], failed={i: c for i, c in s["failed"]}, restarts=s["restarts"],
                      wall_s=s["wall_s"], infer_s=s["infer_s"], output_tokens=s["output_tokens"],
                      prediction_file=s["prediction_file"], score=s["score"], eval_error=s["eval_error"],
                      report_file=s["report_file"], engine_stats=s["engine_stats"])


def run_ranked(card, dataset_name: str, ranks: Ranks, *, work_dir: str, mode: str, judge: str, engine: str,
               limit: int | None, engine_options: dict, nproc: int, prep_workers: int) -> RunSummary:
    """This rank's part of the run; every rank returns the whole run's summary."""
    started = time.perf_counter()
    assign_devices(ranks, engine_options.get("tensor_parallel_size", 1))   # before anything starts CUDA
    with Group(ranks) as group:
        step = "infer"
        try:
            # Rank 0 first: a download or a tiny model's build happens once, then the others read it.
            dataset = group.first("dataset", lambda: _load(card, dataset_name, limit))
            summary = RunSummary(card.name, dataset_name, items=len(dataset.data))
            summary.prediction_file = bridge.prediction_file(work_dir, card.name, dataset_name)
            positions = ranks.positions(len(dataset.data))
            results = infer(card, dataset, work_dir=work_dir, engine=engine, engine_options=engine_options,
                            prep_workers=prep_workers, summary=summary, positions=positions,
                            journal_file=journal_path(work_dir, card.name, dataset_name, ranks))
            written = bridge.write_rank_file(dataset, positions, {i: r.prediction for i, r in results.items()},
                                             bridge.rank_file(work_dir, card.name, dataset_name, ranks.rank,
                                                              ranks.world_size))
            log.info("%s wrote %s (%d items)", ranks, os.path.basename(written), len(positions))
            group.announce("infer", shard_message(summary))
            step = "done"
            if ranks.rank != 0:
                try:
                    outcome = group.wait("done", ranks=[0])[0]
                finally:
                    group.announce("exit")
                return summary_from_message(card.name, dataset_name, outcome)
            merge_shards(summary, group.wait("infer"))
            answers = bridge.merge_rank_files(dataset, work_dir, card.name, ranks.world_size)
            bridge.write_predictions(dataset, answers, summary.prediction_file)
            forget_state(work_dir, card.name, dataset_name)
            if mode == "all":
                score(dataset, summary, judge, nproc)
            finish(summary, card, started)
            group.announce("done", outcome_message(summary))
            _wait_for_exits(group)
            return summary
        except BaseException as exc:
            if step == "infer":
                group.announce("infer", error=exc)
            if ranks.rank == 0:
                group.announce("done", error=f"{ranks} failed: {type(exc).__name__}: {exc}")
                _wait_for_exits(group)
            elif step == "infer":
                group.announce("exit")
            raise


def _load(card, dataset_name: str, limit: int | None):
    dataset = bridge.load_dataset(dataset_name, limit)
    card.path()   # builds a tiny local checkpoint once, before every rank reads it
    return dataset


def _wait_for_exits(group: Group) -> None:
    """Keep rank 0's store up until the others have read the outcome (they then exit on their own)."""
    try:
        group.wait("exit", ranks=range(1, group.ranks.world_size), timeout=EXIT_WAIT_S)
    except RankError as exc:
        log.warning("%s", exc)
