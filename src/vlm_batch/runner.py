"""One evaluation, as a straight line: row -> prompt -> request -> engine -> prediction -> file -> score.

Every finished prediction goes to the journal before the next is taken, so a rerun of the same
command picks up where a crash, a kill or Ctrl-C left off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from . import vlmeval_bridge as bridge
from .images import open_rgb
from .journal import Journal, key, read
from .plugins import pm
from .request import Result

log = logging.getLogger(__name__)
RESTARTS = 1   # an engine that dies is restarted this many times per run


class PluginError(RuntimeError):
    pass


@dataclass
class RunSummary:
    model: str
    dataset: str
    engine: str | None = None
    items: int = 0
    generated: int = 0                           # answered in this run
    resumed: int = 0                             # answered by an earlier run, reused
    failed: dict = field(default_factory=dict)   # index -> cause
    restarts: int = 0
    wall_s: float = 0.0
    infer_s: float = 0.0
    output_tokens: int = 0
    prediction_file: str | None = None
    score: Any = None
    eval_error: str | None = None                # VLMEvalKit's evaluator failed; predictions are kept
    report_file: str | None = None
    engine_stats: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.generated / self.infer_s if self.infer_s else 0.0


def decode_images(message: list[dict]) -> list[dict]:
    """The same message, each image part carrying its picture as RGB under `image`."""
    return [dict(part, image=open_rgb(part["value"])) if part["type"] == "image" else part
            for part in message]


def prepare(card, index, message, dataset_name: str):
    """One message as an engine Request, its tokens counted here so batching needs no tokenizer."""
    from .memory import prompt_tokens

    request = pm.hook.vlm_batch_prepare(card=card, message=decode_images(message), dataset=dataset_name)
    if request is None:
        raise PluginError(f"no plugin prepares requests for '{card.name}' (family {card.family})")
    request.index, request.dataset = index, dataset_name
    request.prompt_tokens = request.prompt_tokens or prompt_tokens(card, request)
    return request


def prepare_row(card, dataset, build, i: int):
    """Row `i` as a Request, or as a failed Result naming the row and the cause."""
    line = dataset.data.iloc[i]
    index = line["index"]
    try:
        return prepare(card, index, build(line), dataset.dataset_name)
    except Exception as exc:
        result = Result.failed(index, exc)
        log.warning("item %s failed before generation: %s", index, result.error)
        return result


def build_requests(card, dataset, failures: list, workers: int = 0):
    """Requests for every row, in order, prepared in this process (workers=0) or in a pool."""
    from .prefetch import Preparer

    with Preparer(card, dataset, workers) as preparer:
        yield from preparer.requests(failures)


def generate(card, engine, requests):
    """Every request through the engine (the generate hook), post-processed, as results finish."""
    asked = {}

    def remembered():
        for request in requests:
            asked[key(request.index)] = request
            yield request

    for result in pm.hook.vlm_batch_generate(card=card, engine=engine, requests=remembered()):
        request = asked.pop(key(result.index), None)
        if result.ok and request is not None:
            result.text = pm.hook.vlm_batch_postprocess(card=card, request=request, text=result.text)
        if not result.ok:
            log.warning("item %s failed: %s", result.index, result.error)
        yield result


def journal_path(work_dir: str, model: str, dataset: str) -> str:
    """Beside VLMEvalKit's files, in a folder its resume logic never looks into."""
    import os.path as osp

    return osp.join(bridge.pred_root(work_dir, model), ".vlm-batch", f"{model}_{dataset}.journal")


def load_progress(work_dir: str, card, dataset_name: str) -> tuple[dict, dict]:
    """(earlier answers, journal records) for this model and dataset; failed answers are retried."""
    path = journal_path(work_dir, card.name, dataset_name)
    header, records = read(path)
    if header and (header.get("model"), header.get("dataset")) != (card.name, dataset_name):
        raise bridge.DatasetError(f"{path} belongs to {header.get('model')} on {header.get('dataset')}")
    answers = bridge.previous_predictions(work_dir, card.name, dataset_name)
    answers.update({k: r["prediction"] for k, r in records.items() if "error" not in r})
    return answers, records


def infer(card, dataset, *, work_dir: str, engine, engine_options: dict, prep_workers: int,
          summary: RunSummary) -> dict:
    """Answers for every row: reused, generated now (journaled as they finish), or failed."""
    from .engines import EngineError, engine_stats, load_engine
    from .prefetch import Preparer
    from .progress import bar, counted

    answers, _ = load_progress(work_dir, card, dataset.dataset_name)
    indices = [key(i) for i in dataset.data["index"]]
    summary.resumed = sum(i in answers for i in indices)
    if summary.resumed:
        log.info("resuming: %d of %d items already answered", summary.resumed, len(indices))
    results = {i: Result(index=i, text=answers[i]) for i in indices if i in answers}
    journal = Journal(journal_path(work_dir, card.name, dataset.dataset_name),
                      {"model": card.name, "dataset": dataset.dataset_name, "vlm_batch": __version__})
    own_engine = isinstance(engine, str)
    failures: list = []   # rows that failed while being prepared (possibly in another thread)
    left = len(indices) - len(results)
    prepared, answered = bar(left, "prepare", 0), bar(left, "generate", 1)
    verbose = engine_options.get("verbose", False)

    def record(result) -> None:
        journal.append(result)
        results[key(result.index)] = result
        answered.update(1)
        if verbose and answered.n % 16 == 0:
            answered.set_postfix_str(_brief(engine_stats(eng)), refresh=False)

    def saved() -> str:
        return f"{len(results)} of {len(indices)} items are saved, rerun the same command to resume"

    try:
        todo = [p for p, i in enumerate(indices) if i not in results]
        with Preparer(card, dataset, prep_workers) as preparer:   # a pool forks before the engine starts
            while todo:
                try:
                    eng = load_engine(engine, card, **engine_options) if own_engine else engine
                except EngineError as exc:
                    if not summary.restarts:
                        raise
                    raise EngineError(f"the engine could not be restarted: {exc}; {saved()}") from exc
                summary.engine = eng.name
                t0 = time.perf_counter()
                try:
                    stream = counted(preparer.requests(failures, positions=todo), prepared)
                    for result in generate(card, eng, stream):
                        while failures:
                            record(failures.pop(0))
                        record(result)
                    while failures:
                        record(failures.pop(0))
                    todo = []
                except EngineError as exc:
                    todo = [p for p in todo if indices[p] not in results]
                    if not own_engine or summary.restarts >= RESTARTS:
                        raise EngineError(f"{exc}; {saved()}") from exc
                    summary.restarts += 1
                    log.error("%s; restarting the engine for the %d items left", exc, len(todo))
                finally:
                    summary.infer_s += time.perf_counter() - t0
                    summary.engine_stats = engine_stats(eng)
                    if own_engine:
                        eng.close()
    finally:
        journal.close()
        prepared.close()
        answered.close()
    fresh = [r for i, r in results.items() if i not in answers]
    summary.generated = sum(r.ok for r in fresh)
    summary.output_tokens = sum(r.output_tokens for r in fresh)
    summary.failed = {i: r.error for i, r in results.items() if not r.ok}
    return results


def _brief(stats: dict) -> str:
    """Batch statistics for the progress line."""
    if "window" in stats:
        w = stats["window"]
        return f"in flight {w['mean_in_flight']}/{w['size']}, steps {w['steps']}"
    if "processor" in stats:
        p = stats["processor"]
        return f"batches {p['batches']}, fill {p['batch_fill']:.2f}, splits {p['splits']}, fallbacks {p['fallbacks']}"
    return ""


def run_eval(card, dataset_name: str, *, work_dir: str = "./outputs", mode: str = "all",
             judge: str = bridge.DEFAULT_JUDGE, engine="vllm", limit: int | None = None,
             engine_options: dict | None = None, nproc: int = 4, prep_workers: int = 0) -> RunSummary:
    """`engine` is an engine name, or an engine already running (the caller then closes it)."""
    import os

    from .engines import check_choice
    from .report import write_run_report

    started = time.perf_counter()
    options = engine_options or {}
    if mode != "eval" and isinstance(engine, str):
        check_choice(card, engine, options.get("trust_remote_code", False))
    dataset = bridge.load_dataset(dataset_name, limit)   # before any model: bad data fails fast
    summary = RunSummary(card.name, dataset_name, items=len(dataset.data))
    summary.prediction_file = bridge.prediction_file(work_dir, card.name, dataset_name)
    if mode in ("all", "infer"):
        results = infer(card, dataset, work_dir=work_dir, engine=engine, engine_options=options,
                        prep_workers=prep_workers, summary=summary)
        bridge.write_predictions(dataset, {i: r.prediction for i, r in results.items()},
                                 summary.prediction_file)
        # The answers now live in the prediction file; drop the run's state, as VLMEvalKit does.
        for path in bridge.vlmeval_state_files(work_dir, card.name, dataset_name):
            os.remove(path)
        os.remove(journal_path(work_dir, card.name, dataset_name))
    if mode in ("all", "eval"):
        if not os.path.exists(summary.prediction_file):
            raise bridge.DatasetError(f"No predictions to evaluate: {summary.prediction_file} does not exist "
                                      "(run with --mode infer or all first)")
        try:
            summary.score = bridge.evaluate(dataset, summary.prediction_file, judge=judge, nproc=nproc)
        except Exception as exc:   # the predictions are written; say why scoring failed, keep them
            summary.eval_error = f"{type(exc).__name__}: {exc}"
            log.error("VLMEvalKit's evaluation failed: %s", summary.eval_error)
    summary.wall_s = time.perf_counter() - started
    summary.report_file = write_run_report(summary, card)
    return summary
