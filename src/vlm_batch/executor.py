"""One model over its datasets, as one straight line:

    every dataset's rows, in order -> prepared requests -> one engine stream -> results
      -> each dataset's journal, as each result arrives
      -> when a dataset's last row is in: its prediction file and VLMEvalKit's score, in a worker
         (`finisher`), while the engine goes on with the next dataset's rows.

The engine never drains at a dataset boundary: the rows of the next dataset are already queued. Where
this happens (one process, ranks, Ray replicas) is the placement's business; this module asks it for
an engine, a share of rows and, per dataset, all the answers, and never the other way round.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from . import __version__, report, state
from .engines import EngineError
from .engines.threads import seen
from .finisher import DatasetRun, Finisher
from .journal import Journal, key
from .progress import brief
from .report import RunSummary
from .stages import Ledger
from .stages import here as costs
from .request import Result
from .timeline import Timeline
from .vlmeval.datasets import needs_download
from .vlmeval.files import prediction_file
from .writes import WriteError, check_writable

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, placement, settings, datasets, judges=None, progress=None):
        """`datasets(name)` returns VLMEvalKit's dataset object (loaded once for every model); `judges`
        is the suite's judge service (one judge server for every dataset), `progress` its bar."""
        self.placement, self.settings, self.datasets = placement, settings, datasets
        self.judges, self.progress = judges, progress
        self.engine_times: dict = {}     # the last model's engine: began, ready, closed

    # -- the line ----------------------------------------------------------------------------------

    def run(self, spec, names: list[str], options: dict, timeline: Timeline) -> list[RunSummary]:
        s, card = self.settings, spec.card
        done = {} if s.rerun or s.mode == "eval" else self._finished_before(card, names)
        left = [n for n in names if n not in done]
        if not left:
            return [done[n] for n in names]
        locks = state.Locks()
        self.engine_times = {}
        runs: list = []
        try:
            check_writable(state.state_dir(s.work_dir, card.name))   # before any engine starts
            if s.mode == "eval":
                runs = self.placement.first("datasets", lambda: [self._plan(card, n) for n in left])
                timeline.mark("dataset_load")
                with self._finisher(card, None) as finisher:
                    if self.placement.writer:   # --mode eval under torchrun: one scoring is enough
                        for run in runs:
                            finisher.submit(run, infer=False)
                        finisher.wait(timeline)
            else:   # before any engine starts: a second run of the same refuses at once
                self.placement.on_writer("locks", lambda: [locks.take(state.RunLock(s.work_dir, card.name, n),
                                                                      s.wait) for n in left])
                for name in [n for n in left if needs_download(n)]:   # a download fails before an engine starts
                    self.placement.first(f"download {name}", lambda name=name: self.datasets(name))
                with self._finisher(card, locks) as finisher:
                    with self._engine(spec, options) as start:
                        timeline.mark("engine_start")   # its library's imports and its process's spawn, here
                        runs[:] = self.placement.first("datasets", lambda: [self._plan(card, n) for n in left])
                        timeline.mark("dataset_load")
                        self._generate(card, runs, start, timeline, finisher)
                    timeline.mark("shutdown")
                    finisher.wait(timeline)
        except WriteError as exc:
            if not runs:   # before any engine started: nothing of this run to keep
                raise
            saved, total = sum(len(r.results) for r in runs), sum(len(r.positions) for r in runs)
            raise WriteError(f"{exc}; {saved} of {total} items are answered and saved, rerun the same "
                             "command to resume") from exc
        finally:
            locks.release_all()
        done.update({r.name: r.summary for r in runs})
        return [done[n] for n in names]

    @contextmanager
    def _engine(self, spec, options: dict):
        """The model's engine for the span of its generation: closed, and the GPU handed to a judge that
        waits for it, here and only here, however generation ends."""
        from .engines.start import EngineStart

        if self.judges is not None:
            self.judges.engine_started()
        start = EngineStart.running(spec.engine) if spec.running else \
            self.placement.start(spec.card, spec.choice, options)
        try:
            yield start
        finally:
            start.close()
            self.engine_times = start.times()
            if self.judges is not None:
                self.judges.engine_released()   # a judge waiting for the GPU may start now

    @contextmanager
    def _finisher(self, card, locks):
        finisher = Finisher(self.settings, self.placement, self.judges, card, locks)
        try:
            yield finisher
        except KeyboardInterrupt:
            finisher.interrupt()
            raise
        finally:
            finisher.shutdown()

    def _finished_before(self, card, names) -> dict:
        out = {}
        for name in names:
            summary = report.finished_summary(prediction_file(self.settings.work_dir, card.name, name),
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
                             prediction_file=prediction_file(s.work_dir, card.name, name))
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

    def _generate(self, card, runs: list[DatasetRun], start, timeline: Timeline, finisher: Finisher) -> None:
        """Every dataset's rows through the engine, each result journaled as it arrives, each dataset
        handed to the finisher when its last row is in."""
        s, bar = self.settings, self.progress
        by_name = {r.name: r for r in runs}
        if bar is not None:
            bar.model(card.name, sum(r.left for r in runs), {r.name: r.left for r in runs})
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
        with self.placement.preparer(card, {r.name: r.dataset for r in runs}, s.prep_workers, fit, start) as preparer:
            stream = self.placement.answer(card, start, preparer, work, on_restart=restarted)
            first, began = True, time.time()
            share_from = None   # rows of several datasets share the engine: each is given the stretch
            #                     from the previous dataset's end to its own, which add up to the whole
            try:
                for result in stream:
                    if first:
                        first = False
                        timeline.mark("engine_start", start.ready_at)
                        timeline.mark("first_item")
                        next(r for r in runs if r.todo).first_at = max(start.ready_at, began)   # its rows began it
                    run = by_name[result.dataset]
                    now = time.time()
                    run.first_at = run.first_at or now
                    run.last_at = now
                    with costs.stage("journal"):
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
                if first and any(r.todo for r in runs):
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
                threads = seen(getattr(preparer, "worker_threads", {}))
                ledger = getattr(preparer, "ledger", None) or Ledger()
                ledger.add(costs.take(), "this process")
                stage_costs = ledger.report()
                for run in runs:
                    run.summary.threads, run.summary.stages = threads, stage_costs
                    run.summary.engine = used
                    run.summary.engine_fallback = start.fallback
                    run.summary.engine_stats = stats
                    if run.journal is not None and run.left:
                        run.journal.close()   # the unfinished: closed between records, for a rerun
