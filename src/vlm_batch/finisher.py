"""The end of a dataset's line: once its last row is in, every answer gathered, its prediction file
written, the run's state dropped and VLMEvalKit's score taken, in a worker, while the engine goes on.

    results -> (placement.gather) -> prediction file -> state dropped -> score -> run report
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import report, state
from .journal import Journal
from .report import RunSummary
from .vlmeval import DEFAULT_JUDGE
from .vlmeval.files import write_predictions
from .vlmeval.scoring import evaluate

log = logging.getLogger(__name__)


@dataclass
class DatasetRun:
    """One dataset of the model's stream: what this process answers, and what is answered so far."""
    dataset: Any                       # VLMEvalKit's dataset object
    summary: RunSummary
    journal_file: str
    positions: list                    # this process's share of the rows
    answers: dict = field(default_factory=dict)    # reused from earlier runs
    results: dict = field(default_factory=dict)    # index -> Result, this process's share
    todo: list = field(default_factory=list)
    journal: Journal | None = None
    left: int = 0
    first_at: float | None = None
    last_at: float | None = None
    written_s: float = 0.0             # writing its prediction file
    share_from: float | None = None    # its share of the stream began: when the dataset before it finished
    finished: Future | None = None

    @property
    def name(self) -> str:
        return self.dataset.dataset_name


class Finisher:
    """A worker that, per dataset and in the order they finish, gathers every answer, writes the
    prediction file, drops the run's state and scores it, while the engine goes on."""

    def __init__(self, settings, placement, judges, card, locks):
        self.settings, self.placement, self.judges, self.card, self.locks = settings, placement, judges, card, locks
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-batch-finish")
        self.futures: list[Future] = []
        self.deferred: list[DatasetRun] = []   # written, their scoring waiting for the engine's release
        self.intervals: list[tuple[str, float, float]] = []

    def submit(self, run: DatasetRun, infer: bool = True) -> None:
        if run.journal is not None:
            run.journal.close()
        run.finished = self.pool.submit(self._finish, run, infer)
        self.futures.append(run.finished)

    def _finish(self, run: DatasetRun, infer: bool) -> None:
        s, summary = self.settings, run.summary
        t0 = time.time()
        fresh = [r for i, r in run.results.items() if i not in run.answers]
        summary.generated = sum(r.ok for r in fresh)
        summary.output_tokens = sum(r.output_tokens for r in fresh)
        summary.truncated = sum(1 for r in fresh if r.truncated)
        summary.failed = {i: r.error for i, r in run.results.items() if not r.ok}
        if run.first_at is not None:
            summary.infer_s = run.last_at - (run.share_from or run.first_at)
        if infer:
            answers = self.placement.gather(run)
            t1 = time.time()
            self.intervals.append(("waiting_for_ranks", t0, t1))
            if answers is None:   # another process writes and scores this dataset
                return
            write_predictions(run.dataset, answers, summary.prediction_file)
            state.forget(s.work_dir, self.card.name, run.name)
            if self.locks is not None:
                for lock in list(self.locks.locks):
                    if lock.dataset == run.name:
                        self.locks.release(lock)
        else:
            t1 = t0
        self.intervals.append(("writing", t1, time.time()))
        run.written_s = time.time() - t1
        if s.mode in ("all", "eval") and self.judges is not None and self.judges.waits_for_engine(run.dataset):
            self.deferred.append(run)   # its judge needs the GPU the engine holds: scored in `wait`
            return
        self._score(run)

    def _score(self, run: DatasetRun) -> None:
        s, summary = self.settings, run.summary
        t2 = time.time()
        if s.mode in ("all", "eval"):
            score(run.dataset, summary, s.judge, s.nproc, self.judges)
        t3 = time.time()
        self.intervals.append(("scoring", t2, t3))
        summary.timings = {"writing_s": round(run.written_s, 3), "scoring_s": round(t3 - t2, 3),
                           "scoring_started_at": t2, "scoring_ended_at": t3,
                           "first_answer_at": run.first_at, "last_answer_at": run.last_at}
        summary.report_file = report.report_path(summary.prediction_file, summary.model, summary.dataset)
        report.write_run_report(summary, self.card)
        self.intervals.append(("writing", t3, time.time()))

    def wait(self, timeline) -> None:
        """Every dataset finished; then those whose judge waited for the engine (released by now)."""
        for future in self.futures:
            future.result()
        deferred, self.deferred = self.deferred, []
        for future in [self.pool.submit(self._score, run) for run in deferred]:
            future.result()
        timeline.wait(self.intervals, rest="finishing")

    def interrupt(self) -> None:
        """Ctrl-C: a scoring that is judging ends now (its server stopped; what was judged stays cached)
        instead of being waited for; writing and rule-based scoring are short and finish."""
        self.deferred = []
        if self.judges is not None:
            self.judges.close()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def score(dataset, summary: RunSummary, judge: str, nproc: int, judges=None) -> None:
    """VLMEvalKit's scoring of the prediction file; a failure is reported, the predictions kept.

    With a local judge (or --judge-base-url), `judges` gives the suite's one judge server; datasets
    VLMEvalKit scores by rule do not wait for it. Other judges are VLMEvalKit's as it names them.
    """
    if not os.path.exists(summary.prediction_file):
        summary.eval_error = (f"no predictions to evaluate: {summary.prediction_file} does not exist "
                              "(run with --mode infer or all first)")
        log.error("%s: %s", summary.dataset, summary.eval_error)
        return
    from .judge import JudgeError
    from .judge.service import score_with

    try:
        if judges is not None and judges.scores(dataset):
            summary.score, summary.judge = score_with(dataset, summary.prediction_file, judges.get())
        else:
            summary.score = evaluate(dataset, summary.prediction_file, judge=judge, nproc=nproc)
            summary.judge = {"model": judge, "name": judge} if judge != DEFAULT_JUDGE else {}
    except JudgeError as exc:
        summary.eval_error = f"judge: {exc}"
        summary.judge = exc.stats or {"model": judge, "name": judge, "error": str(exc)}
        log.error("%s: scoring stopped: %s", summary.dataset, exc)
    except Exception as exc:   # the predictions are written; say why scoring failed, keep them
        summary.eval_error = f"{type(exc).__name__}: {exc}"
        log.error("%s: VLMEvalKit's evaluation failed: %s", summary.dataset, summary.eval_error)
