"""What runs on the Ray cluster's workers: preparation tasks (rows to pickled Requests) and the engine
replicas (batches of Requests to answers), each started by the same plugin hooks as a local run."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time

from ..engines import EngineError
from ..journal import key
from ..request import Result
from .stream import answered

log = logging.getLogger(__name__)
RESULT_ROWS = 8      # a replica sends its answers back in groups of this many, as they finish


_datasets: dict = {}   # per worker process: the dataset objects fetched once from the object store


def _dataset(refs: dict, name: str):
    import ray

    ref = refs[name]
    if ref.hex() not in _datasets:
        _datasets[ref.hex()] = ray.get(ref)
    return _datasets[ref.hex()]


def _worker() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def prepare_batch(batch: dict, card, dataset_refs: dict, fit=None) -> dict:
    """Rows (by dataset and position) as pickled Requests, or the cause a row cannot be asked; a CPU task."""
    from ..plugins import load_plugins
    from ..prepare import Builders

    load_plugins()   # a fresh worker: the installed plugins, as the driver has them
    builders = Builders(card, {n: _dataset(dataset_refs, n) for n in set(batch["dataset"])}, fit)
    out = {"dataset": [], "position": [], "index": [], "request": [], "error": [], "prepared_by": []}
    for name, position in zip(batch["dataset"], batch["position"]):
        prepared = builders.row(str(name), int(position))
        failed = isinstance(prepared, Result)
        out["dataset"].append(str(name))
        out["position"].append(int(position))
        out["index"].append(json.dumps(key(prepared.index)))
        out["request"].append(b"" if failed else pickle.dumps(prepared))
        out["error"].append(prepared.error if failed else "")
        out["prepared_by"].append(_worker())
    return out


class Replica:
    """One engine, started by the same plugin hooks as a single-process run, answering batches."""

    def __init__(self, card, choice, engine_options: dict):
        from ..engines.start import EngineStart
        from ..plugins import load_plugins

        load_plugins()
        self.card = card
        self.start = EngineStart(card, choice, engine_options)
        self.start.get()   # up (or fallen back) before the first batch, or the actor fails with why
        self.id = _worker()
        self.restarts = 0
        self.ready_at = time.time()   # generation time is counted from the first replica ready

    def __call__(self, batch: dict):
        """The batch's answers, RESULT_ROWS at a time as they finish; an engine that dies is
        restarted once per batch, and the batch's rows not yet answered go to the new one."""
        rows = list(zip(batch["dataset"], batch["index"], batch["position"], batch["prepared_by"]))
        where = {(str(d), json.loads(i)): (int(p), str(by)) for d, i, p, by in rows}
        pending, done = [], []
        for name, index, blob, error in zip(batch["dataset"], batch["index"], batch["request"], batch["error"]):
            if blob:
                pending.append(pickle.loads(blob))
            else:
                done.append(Result(index=json.loads(index), error=str(error), dataset=str(name)))

        def restarted(exc):
            log.error("replica %s: %s; restarting its engine", self.id, exc)
            self.restarts += 1

        try:
            for result in answered(self.card, self.start, pending, on_restart=restarted):
                done.append(result)
                if len(done) >= RESULT_ROWS:
                    yield self._rows(done, where)
                    done = []
        except EngineError as exc:
            raise EngineError(f"replica {self.id}: {exc}") from exc
        if done:
            yield self._rows(done, where)

    def _rows(self, results: list, where: dict) -> dict:
        spots = [where[(r.dataset, key(r.index))] for r in results]
        return {"dataset": [r.dataset for r in results],
                "position": [p for p, _ in spots],
                "index": [json.dumps(key(r.index)) for r in results],
                "text": ["" if r.text is None else r.text for r in results],
                "error": ["" if r.ok else r.error for r in results],
                "prompt_tokens": [int(r.prompt_tokens) for r in results],
                "output_tokens": [int(r.output_tokens) for r in results],
                "truncated": [json.dumps(r.truncated) for r in results],
                "replica": [self.id] * len(results), "engine": [self.start.name] * len(results),
                "restarts": [self.restarts] * len(results), "ready_at": [self.ready_at] * len(results),
                "prepared_by": [by for _, by in spots]}
