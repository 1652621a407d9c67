"""One model over its datasets, as one straight line:

    every dataset's rows, in order -> prepared requests -> one engine stream -> results
      -> each dataset's journal, as each result arrives
      -> when a dataset's last row is in: its prediction file and VLMEvalKit's score, in a worker,
         while the engine goes on with the next dataset's rows.

The engine never drains at a dataset boundary: the rows of the next dataset are already queued. Where
this happens (one process, ranks, Ray replicas) is the placement's business; this module asks it for
an engine, a share of rows and, per dataset, all the answers, and never the other way round.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import __version__, report, state
from . import vlmeval_bridge as bridge
from .engines import EngineError
from .journal import Journal, key
from .progress import brief
from .report import RunSummary
from .request import Result
from .timeline import Timeline

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


@dataclass
class Settings:
    work_dir: str = "./outputs"
    mode: str = "all"
    judge: str = bridge.DEFAULT_JUDGE
    nproc: int = 4
    judge_base_url: str | None = None  # a judge server the user runs (VLMEvalKit's --judge-base-url)
    judge_nproc: int = 64              # concurrent calls to a local or --judge-base-url judge
    judge_gpu_share: float | None = None   # a local judge's GPU memory share: it then runs beside the engine
    prep_workers: int = 0
    rerun: bool = False
    wait: bool = False
    verbose: bool = False
    truncate: bool = False             # cut over-long prompts' text to fit, instead of failing them
    trust_remote_code: bool = False    # what --truncate may load to count tokens


class Executor:
    def __init__(self, placement, settings: Settings, datasets, progress=None):
        """`datasets(name)` returns VLMEvalKit's dataset object (loaded once for every model)."""
        self.placement, self.settings, self.datasets = placement, settings, datasets
        self.progress = progress
        self.engine_times: dict = {}     # the last model's engine: began, ready, closed
        self.judges = None               # the suite's JudgeService (one judge server for every dataset)

    # -- the line ----------------------------------------------------------------------------------

    def run(self, card, names: list[str], engine, options: dict, timeline: Timeline) -> list[RunSummary]:
        s = self.settings
        done = {} if s.rerun or s.mode == "eval" else self._finished_before(card, names)
        left = [n for n in names if n not in done]
        if not left:
            return [done[n] for n in names]
        locks = state.Locks()
        self.engine_times = {}
        try:
            if s.mode != "eval":   # before any engine starts: a second run of the same refuses at once
                self.placement.on_writer("locks", lambda: [locks.take(state.RunLock(s.work_dir, card.name, n),
                                                                      s.wait) for n in left])
            if s.mode != "eval" and self.judges is not None:
                self.judges.engine_started()
            start = self.placement.start(card, engine, options) if s.mode != "eval" else None
            timeline.mark("engine_start")   # its library's imports and its process's spawn, here
            try:
                runs = self.placement.first("datasets", lambda: [self._plan(card, n) for n in left])
                timeline.mark("dataset_load")
                if s.mode == "eval":
                    results = self._score_only(card, runs, timeline)
                else:
                    results = self._generate(card, runs, start, timeline, locks)
            finally:
                if start is not None:
                    start.close()
                    self.engine_times = start.times()
                if self.judges is not None:
                    self.judges.engine_released()
        finally:
            locks.release_all()
        done.update({r.name: r.summary for r in results})
        return [done[n] for n in names]

    def _finished_before(self, card, names) -> dict:
        out = {}
        for name in names:
            summary = report.finished_summary(bridge.prediction_file(self.settings.work_dir, card.name, name),
                                              card.name, name)
            if summary is not None:
                log.info("%s on %s: finished by an earlier run (its predictions and score exist); "
                         "pass --rerun to run it again", card.name, name)
                out[name] = summary
        return out

    def _plan(self, card, name: str) -> DatasetRun:
        """The dataset, this process's rows of it, and what earlier runs already answered."""
        s = self.settings
        dataset = self.datasets(name)
        summary = RunSummary(card.name, name, items=len(dataset.data),
                             prediction_file=bridge.prediction_file(s.work_dir, card.name, name))
        jpath = self.placement.journal_path(s.work_dir, card.name, name)
        if s.rerun and s.mode != "eval":
            state.forget(s.work_dir, card.name, name)
            answers = {}
        else:
            answers = {} if s.mode == "eval" else state.load_progress(s.work_dir, card.name, name, own=jpath)[0]
        every = list(dataset.data["index"])
        positions = list(self.placement.share(len(every)))
        run = DatasetRun(dataset, summary, jpath, positions)
        run.answers = {key(every[p]): answers[key(every[p])] for p in positions if key(every[p]) in answers}
        run.results = {i: Result(index=i, text=a, dataset=name) for i, a in run.answers.items()}
        run.todo = [p for p in positions if key(every[p]) not in run.results]
        run.left = len(run.todo)
        summary.resumed = len(run.results)
        if summary.resumed:
            log.info("%s: resuming, %d of %d items already answered", name, summary.resumed, len(positions))
        return run

    def _generate(self, card, runs: list[DatasetRun], start, timeline: Timeline, locks) -> list[DatasetRun]:
        s = self.settings
        by_name = {r.name: r for r in runs}
        finisher = Finisher(self, card, locks)
        bar = self.progress
        if bar is not None:
            bar.model(card.name, sum(r.left for r in runs), {r.name: r.left for r in runs})
        try:
            for run in runs:
                run.journal = Journal(run.journal_file, {"model": card.name, "dataset": run.name,
                                                         "vlm_batch": __version__})
                if not run.left:
                    finisher.submit(run)
            work = ((r.name, p) for r in runs for p in r.todo)

            def restarted(exc):
                for r in runs:
                    if r.left:
                        r.summary.restarts += 1

            fit = None
            if s.truncate:
                from .truncate import Fit

                fit = Fit(card, s.trust_remote_code)
            with self.placement.preparer(card, {r.name: r.dataset for r in runs}, s.prep_workers, fit) as preparer:
                stream = self.placement.answer(card, start, preparer, work, on_restart=restarted)
                engine, began = None, time.time()
                share_from = None   # rows of several datasets share the engine: each is given the stretch
                #                     from the previous dataset's end to its own, which add up to the whole
                try:
                    for result in stream:
                        if engine is None:
                            engine = start.engine
                            timeline.mark("engine_start", start.ready_at)
                            timeline.mark("first_item")
                            first = next(r for r in runs if r.todo)
                            first.first_at = max(start.ready_at, began)   # the stream began with its rows
                        run = by_name[result.dataset]
                        now = time.time()
                        run.first_at = run.first_at or now
                        run.last_at = now
                        run.journal.append(result)
                        run.results[key(result.index)] = result
                        run.left -= 1
                        if bar is not None:
                            bar.advance(run.name)
                            if s.verbose and bar.suite.n % 16 == 0:
                                bar.note(brief(start.describe()[1]))
                        if not run.left:
                            run.share_from, share_from = share_from or run.first_at, now
                            run.summary.engine, run.summary.engine_stats = start.describe()   # so far
                            finisher.submit(run)
                    if engine is None and start is not None and any(r.todo for r in runs):
                        timeline.mark("engine_start", start.ready_at)
                        timeline.mark("first_item")
                    timeline.mark("generation")
                except EngineError as exc:
                    saved = sum(len(r.results) for r in runs)
                    total = sum(len(r.positions) for r in runs)
                    message = f"{exc}; {saved} of {total} items are saved, rerun the same command to resume"
                    if any(r.summary.restarts for r in runs):
                        message = f"the engine could not be restarted: {message}"
                    raise EngineError(message) from exc
                finally:
                    used, stats = start.describe()
                    for run in runs:
                        run.summary.engine = used
                        run.summary.engine_fallback = getattr(start, "fallback", None)
                        run.summary.engine_stats = stats
                        if run.journal is not None and run.left:
                            run.journal.close()   # the unfinished: closed between records, for a rerun
            start.close()
            if self.judges is not None:
                self.judges.engine_released()   # a judge waiting for the GPU may start now
            timeline.mark("shutdown")
            finisher.wait(timeline)
        except KeyboardInterrupt:
            finisher.interrupt()
            raise
        finally:
            finisher.shutdown()
        return runs

    def _score_only(self, card, runs: list[DatasetRun], timeline: Timeline) -> list[DatasetRun]:
        if not self.placement.writer:   # --mode eval under torchrun: one scoring is enough
            return runs
        finisher = Finisher(self, card, None)
        try:
            for run in runs:
                finisher.submit(run, infer=False)
            finisher.wait(timeline)
        except KeyboardInterrupt:
            finisher.interrupt()
            raise
        finally:
            finisher.shutdown()
        return runs


class Finisher:
    """A worker that, per dataset and in the order they finish, gathers every answer, writes the
    prediction file, drops the run's state and scores it, while the engine goes on."""

    def __init__(self, executor: Executor, card, locks):
        self.executor, self.card, self.locks = executor, card, locks
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
        s, placement, summary = self.executor.settings, self.executor.placement, run.summary
        t0 = time.time()
        fresh = [r for i, r in run.results.items() if i not in run.answers]
        summary.generated = sum(r.ok for r in fresh)
        summary.output_tokens = sum(r.output_tokens for r in fresh)
        summary.truncated = sum(1 for r in fresh if r.truncated)
        summary.failed = {i: r.error for i, r in run.results.items() if not r.ok}
        if run.first_at is not None:
            summary.infer_s = run.last_at - (run.share_from or run.first_at)
        if infer:
            answers = placement.gather(run)
            t1 = time.time()
            self.intervals.append(("waiting_for_ranks", t0, t1))
            if answers is None:   # another process writes and scores this dataset
                return
            bridge.write_predictions(run.dataset, answers, summary.prediction_file)
            state.forget(s.work_dir, self.card.name, run.name)
            if self.locks is not None:
                for lock in list(self.locks.locks):
                    if lock.dataset == run.name:
                        self.locks.release(lock)
        else:
            t1 = t0
        self.intervals.append(("writing", t1, time.time()))
        run.written_s = time.time() - t1
        judges = self.executor.judges
        if s.mode in ("all", "eval") and judges is not None and judges.waits_for_engine(run.dataset):
            self.deferred.append(run)   # its judge needs the GPU the engine holds: scored in `wait`
            return
        self._score(run)

    def _score(self, run: DatasetRun) -> None:
        s, summary = self.executor.settings, run.summary
        t2 = time.time()
        if s.mode in ("all", "eval"):
            score(run.dataset, summary, s.judge, s.nproc, self.executor.judges)
        t3 = time.time()
        self.intervals.append(("scoring", t2, t3))
        summary.timings = {"writing_s": round(run.written_s, 3), "scoring_s": round(t3 - t2, 3),
                           "scoring_started_at": t2, "scoring_ended_at": t3,
                           "first_answer_at": run.first_at, "last_answer_at": run.last_at}
        summary.report_file = report.report_path(summary.prediction_file, summary.model, summary.dataset)
        report.write_run_report(summary, self.card)
        self.intervals.append(("writing", t3, time.time()))

    def wait(self, timeline: Timeline) -> None:
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
        if self.executor.judges is not None:
            self.executor.judges.close()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def score(dataset, summary: RunSummary, judge: str, nproc: int, judges=None) -> None:
    """VLMEvalKit's scoring of the prediction file; a failure is reported, the predictions kept.

    With a local judge (or --judge-base-url), `judges` gives the suite's one judge server; datasets
    VLMEvalKit scores by rule do not wait for it. Other judges are VLMEvalKit's as it names them.
    """
    import os

    if not os.path.exists(summary.prediction_file):
        summary.eval_error = (f"no predictions to evaluate: {summary.prediction_file} does not exist "
                              "(run with --mode infer or all first)")
        log.error("%s: %s", summary.dataset, summary.eval_error)
        return
    from . import judge as judging

    try:
        if judges is not None and judges.scores(dataset):
            summary.score, summary.judge = judging.score_with(dataset, summary.prediction_file, judges.get())
        else:
            summary.score = bridge.evaluate(dataset, summary.prediction_file, judge=judge, nproc=nproc)
            summary.judge = {"model": judge, "name": judge} if judge != bridge.DEFAULT_JUDGE else {}
    except judging.JudgeError as exc:
        summary.eval_error = f"judge: {exc}"
        summary.judge = exc.stats or {"model": judge, "name": judge, "error": str(exc)}
        log.error("%s: scoring stopped: %s", summary.dataset, exc)
    except Exception as exc:   # the predictions are written; say why scoring failed, keep them
        summary.eval_error = f"{type(exc).__name__}: {exc}"
        log.error("%s: VLMEvalKit's evaluation failed: %s", summary.dataset, summary.eval_error)
