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


def journal_path(work_dir: str, model: str, dataset: str, ranks=None) -> str:
    """Beside VLMEvalKit's files, in a folder its resume logic never looks into; one per rank."""
    import os.path as osp

    shard = f".rank{ranks.rank}of{ranks.world_size}" if ranks is not None and ranks.distributed else ""
    return osp.join(bridge.pred_root(work_dir, model), ".vlm-batch", f"{model}_{dataset}{shard}.journal")


def journal_files(work_dir: str, model: str, dataset: str) -> list[str]:
    """Every journal of this model and dataset: the single-process one and any rank's, of any world size."""
    import os
    import re

    folder = os.path.dirname(journal_path(work_dir, model, dataset))
    pattern = re.compile(re.escape(f"{model}_{dataset}") + r"(\.rank\d+of\d+)?\.journal")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if pattern.fullmatch(n)]


def load_progress(work_dir: str, card, dataset_name: str, own: str | None = None) -> tuple[dict, dict]:
    """(earlier answers, journal records) for this model and dataset; failed answers are retried.

    Every journal counts, so a run resumes what any earlier run left, whatever its number of ranks;
    `own` (this run's journal) is read last, so its records win.
    """
    own = own or journal_path(work_dir, card.name, dataset_name)
    paths = [p for p in journal_files(work_dir, card.name, dataset_name) if p != own] + [own]
    answers = bridge.previous_predictions(work_dir, card.name, dataset_name)
    records: dict = {}
    for path in paths:
        header, found = read(path)
        if header and (header.get("model"), header.get("dataset")) != (card.name, dataset_name):
            raise bridge.DatasetError(f"{path} belongs to {header.get('model')} on {header.get('dataset')}")
        records.update(found)
        answers.update({k: r["prediction"] for k, r in found.items() if "error" not in r})
    return answers, records


def infer(card, dataset, *, work_dir: str, engine, engine_options: dict, prep_workers: int,
          summary: RunSummary, positions=None, journal_file: str | None = None) -> dict:
    """Answers for every row (or the rows at `positions`): reused, generated now (journaled as they
    finish, in `journal_file`), or failed."""
    from .engines import EngineError, engine_stats, load_engine
    from .prefetch import Preparer
    from .progress import bar, counted

    jpath = journal_file or journal_path(work_dir, card.name, dataset.dataset_name)
    answers, _ = load_progress(work_dir, card, dataset.dataset_name, own=jpath)
    every = list(dataset.data["index"])
    positions = list(range(len(every))) if positions is None else list(positions)
    indices = [key(every[p]) for p in positions]
    summary.resumed = sum(i in answers for i in indices)
    if summary.resumed:
        log.info("resuming: %d of %d items already answered", summary.resumed, len(indices))
    results = {i: Result(index=i, text=answers[i]) for i in indices if i in answers}
    journal = Journal(jpath, {"model": card.name, "dataset": dataset.dataset_name, "vlm_batch": __version__})
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
        todo = [p for p, i in zip(positions, indices) if i not in results]
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
                    todo = [p for p in todo if key(every[p]) not in results]
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
    tally(summary, results, answers)
    return results


def tally(summary: RunSummary, results: dict, answers: dict) -> None:
    """The summary's counts: answered now (not in `answers`, the earlier ones), tokens, failures."""
    fresh = [r for i, r in results.items() if i not in answers]
    summary.generated = sum(r.ok for r in fresh)
    summary.output_tokens = sum(r.output_tokens for r in fresh)
    summary.failed = {i: r.error for i, r in results.items() if not r.ok}


def _brief(stats: dict) -> str:
    """Batch statistics for the progress line."""
    if "window" in stats:
        w = stats["window"]
        return f"in flight {w['mean_in_flight']}/{w['size']}, steps {w['steps']}"
    if "processor" in stats:
        p = stats["processor"]
        return f"batches {p['batches']}, fill {p['batch_fill']:.2f}, splits {p['splits']}, fallbacks {p['fallbacks']}"
    return ""


def options_for(engine, options: dict | None, tp: int = 1) -> dict:
    """The options an engine is started with; `tp` GPUs per engine need vLLM (tensor parallel)."""
    options = dict(options or {})
    if tp > 1:
        if engine != "vllm":
            raise PluginError(f"--tp {tp} splits one model across GPUs, which only the vllm engine does; "
                              f"the {engine} engine runs one model per GPU (use more ranks or replicas)")
        options["tensor_parallel_size"] = tp
    return options


def run_eval(card, dataset_name: str, *, work_dir: str = "./outputs", mode: str = "all",
             judge: str = bridge.DEFAULT_JUDGE, engine="vllm", limit: int | None = None,
             engine_options: dict | None = None, nproc: int = 4, prep_workers: int = 0, tp: int = 1,
             ray=None) -> RunSummary:
    """`engine` is an engine name, or an engine already running (the caller then closes it).

    Under torchrun (RANK and WORLD_SIZE set) each rank answers its stride of rows and rank 0 merges
    and scores (see sharded.py); with `ray` (a ray_runner.RayOptions) replicas on a Ray cluster
    answer and this process writes and scores.
    """
    from .engines import check_choice
    from .ranks import RankError, Ranks

    started = time.perf_counter()
    ranks = Ranks.from_env()
    options = options_for(engine, engine_options, tp) if isinstance(engine, str) else dict(engine_options or {})
    if mode != "eval" and isinstance(engine, str):
        check_choice(card, engine, options.get("trust_remote_code", False))
    if (ranks.distributed or ray is not None) and not isinstance(engine, str):
        raise PluginError("ranks and Ray replicas start their own engines: pass an engine name")
    if ranks.distributed and mode != "eval":
        if ray is not None:
            raise RankError(f"{ranks}: --ray starts its own replicas; run it as one process, not under torchrun")
        from .sharded import run_ranked

        return run_ranked(card, dataset_name, ranks, work_dir=work_dir, mode=mode, judge=judge, engine=engine,
                          limit=limit, engine_options=options, nproc=nproc, prep_workers=prep_workers)
    if ranks.rank != 0:   # --mode eval under torchrun: one scoring is enough
        log.info("%s: --mode eval scores on rank 0 only", ranks)
        return RunSummary(card.name, dataset_name,
                          prediction_file=bridge.prediction_file(work_dir, card.name, dataset_name))
    dataset = bridge.load_dataset(dataset_name, limit)   # before any model: bad data fails fast
    summary = RunSummary(card.name, dataset_name, items=len(dataset.data))
    summary.prediction_file = bridge.prediction_file(work_dir, card.name, dataset_name)
    if mode in ("all", "infer"):
        if ray is not None:
            from .ray_runner import infer_on_ray

            results = infer_on_ray(card, dataset, work_dir=work_dir, engine=engine, engine_options=options,
                                   summary=summary, ray_options=ray)
        else:
            results = infer(card, dataset, work_dir=work_dir, engine=engine, engine_options=options,
                            prep_workers=prep_workers, summary=summary)
        bridge.write_predictions(dataset, {i: r.prediction for i, r in results.items()},
                                 summary.prediction_file)
        forget_state(work_dir, card.name, dataset_name)
    if mode in ("all", "eval"):
        score(dataset, summary, judge, nproc)
    return finish(summary, card, started)


def forget_state(work_dir: str, model: str, dataset_name: str) -> None:
    """The answers now live in the prediction file: drop the run's state (journals, VLMEvalKit's
    pickles), as VLMEvalKit does after merging."""
    import os

    for path in bridge.vlmeval_state_files(work_dir, model, dataset_name) + journal_files(work_dir, model,
                                                                                          dataset_name):
        os.remove(path)


def score(dataset, summary: RunSummary, judge: str, nproc: int) -> None:
    """VLMEvalKit's scoring of the prediction file; a failure is reported, the predictions kept."""
    import os

    if not os.path.exists(summary.prediction_file):
        raise bridge.DatasetError(f"No predictions to evaluate: {summary.prediction_file} does not exist "
                                  "(run with --mode infer or all first)")
    try:
        summary.score = bridge.evaluate(dataset, summary.prediction_file, judge=judge, nproc=nproc)
    except Exception as exc:   # the predictions are written; say why scoring failed, keep them
        summary.eval_error = f"{type(exc).__name__}: {exc}"
        log.error("VLMEvalKit's evaluation failed: %s", summary.eval_error)


def finish(summary: RunSummary, card, started: float) -> RunSummary:
    from .report import write_run_report

    summary.wall_s = time.perf_counter() - started
    summary.report_file = write_run_report(summary, card)
    return summary
