"""One evaluation, as a straight line: row -> prompt -> request -> engine -> prediction -> file -> score."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import vlmeval_bridge as bridge
from .images import open_rgb
from .plugins import pm
from .request import Result

log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    pass


@dataclass
class RunSummary:
    model: str
    dataset: str
    engine: str | None = None
    items: int = 0
    generated: int = 0
    failed: dict = field(default_factory=dict)       # index -> cause
    wall_s: float = 0.0
    infer_s: float = 0.0
    output_tokens: int = 0
    prediction_file: str | None = None
    score: Any = None
    engine_stats: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.generated / self.infer_s if self.infer_s else 0.0


def decode_images(message: list[dict]) -> list[dict]:
    """The same message, each image part carrying its picture as RGB under `image`."""
    return [dict(part, image=open_rgb(part["value"])) if part["type"] == "image" else part
            for part in message]


def prepare(card, index, message, dataset_name: str):
    """One message as an engine Request, sized (tokens, memory) here so batching needs no tokenizer."""
    from .memory import prompt_tokens

    request = pm.hook.vlm_batch_prepare(card=card, message=decode_images(message), dataset=dataset_name)
    if request is None:
        raise PluginError(f"no plugin prepares requests for '{card.name}' (family {card.family})")
    request.index, request.dataset = index, dataset_name
    request.prompt_tokens = request.prompt_tokens or prompt_tokens(card, request)
    request.memory = request.memory or pm.hook.vlm_batch_estimate_memory(card=card, request=request)
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


def generate(card, engine, requests) -> dict:
    """Every request through the engine, via the plugin's generate hook; results by index."""
    results = {}
    for result in pm.hook.vlm_batch_generate(card=card, engine=engine, requests=requests):
        if not result.ok:
            log.warning("item %s failed: %s", result.index, result.error)
        results[result.index] = result
    return results


def run_eval(card, dataset_name: str, *, work_dir: str = "./outputs", mode: str = "all",
             judge: str = bridge.DEFAULT_JUDGE, engine="vllm", limit: int | None = None,
             engine_options: dict | None = None, nproc: int = 4, prep_workers: int = 0) -> RunSummary:
    """`engine` is an engine name, or an engine already running (the caller then closes it)."""
    from .engines import check_choice, engine_stats, load_engine
    from .prefetch import Preparer

    started = time.perf_counter()
    options = engine_options or {}
    own_engine = isinstance(engine, str)
    if mode != "eval" and own_engine:
        check_choice(card, engine, options.get("trust_remote_code", False))
    dataset = bridge.load_dataset(dataset_name, limit)   # before any model: bad data fails fast
    summary = RunSummary(card.name, dataset_name, items=len(dataset.data))
    summary.prediction_file = bridge.prediction_file(work_dir, card.name, dataset_name)
    if mode in ("all", "infer"):
        with Preparer(card, dataset, prep_workers) as preparer:   # a pool forks before the engine starts
            eng = load_engine(engine, card, **options) if own_engine else engine
            summary.engine = eng.name
            try:
                t0 = time.perf_counter()
                failures: list = []
                results = generate(card, eng, preparer.requests(failures))
                summary.infer_s = time.perf_counter() - t0
                summary.engine_stats = engine_stats(eng)
                log.debug("engine: %s", summary.engine_stats)
            finally:
                if own_engine:
                    eng.close()
        results.update({r.index: r for r in failures})
        summary.generated = sum(r.ok for r in results.values())
        summary.output_tokens = sum(r.output_tokens for r in results.values())
        summary.failed = {i: r.error for i, r in results.items() if not r.ok}
        bridge.write_predictions(dataset, {i: r.prediction for i, r in results.items()},
                                 summary.prediction_file)
    if mode in ("all", "eval"):
        summary.score = bridge.evaluate(dataset, summary.prediction_file, judge=judge, nproc=nproc)
    summary.wall_s = time.perf_counter() - started
    return summary
