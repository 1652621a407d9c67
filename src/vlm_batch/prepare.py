"""Row -> prompt -> request: VLMEvalKit's message for a row, its images decoded, the plugin's Request.

Preparation is Python work that holds the GIL. Workers (forked processes) do it on other cores, which
pays where decoding is heavy: photo-sized images, where VLMEvalKit's image dump and decoding cost
milliseconds an item. The pool forks before any engine starts, so workers inherit the loaded plugins
and VLMEvalKit but no engine state. How many, unless the user says: `engines.threads.prep_workers`.
Where there are any, they also render each request for vLLM (`engines.rendering`).
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing as mp
import os
from collections import deque

from .images import open_rgb
from .plugins import hooks
from .request import Result
from .stages import Ledger
from .stages import here as costs
from .vlmeval.prompts import prompt_builder

log = logging.getLogger(__name__)
CHUNK = 8          # rows per pool task: enough to amortise the round trip, small enough to start soon
LOOKAHEAD = 32     # pool tasks in flight: bounds the prepared images held in memory


class PluginError(RuntimeError):
    pass


def decode_images(message: list[dict]) -> list[dict]:
    """The same message, each image part carrying its picture as RGB under `image`."""
    return [dict(part, image=open_rgb(part["value"])) if part["type"] == "image" else part
            for part in message]


def prepare(card, index, message, dataset_name: str, fit=None, family=None):
    """One message as an engine Request, its tokens counted here so batching needs no tokenizer;
    `fit` (--truncate) cuts the message's text when the prompt would not fit the context."""
    from .memory import prompt_tokens

    family = family or hooks(card)

    def one(message):
        with costs.stage("open"):
            message = decode_images(message)
        with costs.stage("prepare"):
            request = family.prepare(message, dataset_name)
        if request is None:
            raise PluginError(f"no plugin prepares requests for '{card.name}' (family {card.family})")
        return request

    request = fit(one, message) if fit is not None else one(message)
    request.index, request.dataset = index, dataset_name
    if request.truncated:
        log.warning("item %s of %s: prompt cut from %d to %d tokens to fit the context (--truncate)",
                    index, dataset_name, *request.truncated)
    with costs.stage("prepare", items=0):
        request.prompt_tokens = request.prompt_tokens or prompt_tokens(card, request)
    return request


def build_message(build, line):
    """VLMEvalKit's message for a row; its image dump, inside, is timed as a stage of its own."""
    with costs.stage("prompt"):
        return build(line)


def timed_dump(dataset) -> None:
    """The dataset's image dump, timed as its own stage (once per dataset object)."""
    dump = dataset.dump_image
    if getattr(dump, "timed", False):
        return

    def timed(line):
        with costs.stage("dump"):
            return dump(line)

    timed.timed = True
    dataset.dump_image = timed


def prepare_row(card, dataset, build, i: int, fit=None, family=None):
    """Row `i` as a Request, or as a failed Result naming the row and the cause."""
    line = dataset.data.iloc[i]
    index = line["index"]
    try:
        request = prepare(card, index, build_message(build, line), dataset.dataset_name, fit, family)
        request.position = i
        return request
    except Exception as exc:
        result = Result.failed(index, exc, dataset.dataset_name)
        log.warning("item %s of %s failed before generation: %s", index, dataset.dataset_name, result.error)
        return result


class Builders:
    """The prompt builder of each dataset, made once per process."""

    def __init__(self, card, datasets: dict, fit=None):
        self.card, self.datasets, self.fit, self._built = card, datasets, fit, {}
        self.family = hooks(card)

    def row(self, name: str, position: int):
        if name not in self._built:
            timed_dump(self.datasets[name])
            self._built[name] = prompt_builder(self.card, self.datasets[name])
        return prepare_row(self.card, self.datasets[name], self._built[name], position, self.fit, self.family)


_worker: dict = {}


def _init(card, datasets, fit, rendering):
    from .engines.processes import die_with_parent
    from .engines.threads import one_thread

    die_with_parent()   # a worker outlives no run, even one killed with -9
    one_thread()
    costs.take()   # what this process had measured before the fork is the parent's to report
    _worker["builders"], _worker["rendering"] = Builders(card, datasets, fit), rendering


def _prepare_chunk(chunk: list[tuple[str, int]], render: bool = False) -> tuple:
    """The chunk's rows, rendered for vLLM if asked; who prepared them, with how many torch threads;
    and what each stage cost."""
    from .engines.threads import torch_threads

    rows = [_worker["builders"].row(name, position) for name, position in chunk]
    if render:
        for row in rows:
            if not isinstance(row, Result):
                with costs.stage("render"):
                    _worker["rendering"](row)
    return rows, (os.getpid(), torch_threads()), costs.take()


class Preparer:
    """Requests (or failed Results) for a stream of (dataset name, row position), in order."""

    def __init__(self, card, datasets: dict, workers: int | None = 0, fit=None, rendering=None):
        from .engines.rendering import room_for_descriptors
        from .engines.threads import prep_workers

        self.builders = Builders(card, datasets, fit)
        self.pool = None
        workers = prep_workers(workers, datasets)
        if rendering is not None and not room_for_descriptors():
            rendering = None
        if workers > 0 and "fork" in mp.get_all_start_methods():
            # The heap a worker inherits, out of its garbage collector's sight: a collection that walked
            # it would copy each page it touched, on the worker's clock.
            gc.freeze()
            try:
                self.pool = mp.get_context("fork").Pool(workers, initializer=_init,
                                                   initargs=(card, datasets, fit, rendering))
            finally:
                gc.unfreeze()
        self.workers = workers if self.pool is not None else 0
        self.rendering = rendering if self.pool is not None else None   # only workers render ahead
        self.worker_threads: dict = {}   # pid -> torch threads, as each worker reported them
        self.ledger = Ledger()           # the workers' stage costs, as they sent them back

    def __call__(self, work):
        if self.pool is None:
            for name, position in work:
                yield self.builders.row(name, position)
            return
        work = iter(work)
        chunks = iter(lambda: list(itertools.islice(work, CHUNK)), [])
        pending: deque = deque()
        while True:
            render = self.rendering is not None and self.rendering.wanted()
            pending.extend(self.pool.apply_async(_prepare_chunk, (chunk, render))
                           for chunk in itertools.islice(chunks, LOOKAHEAD - len(pending)))
            if not pending:
                return
            rows, (pid, threads), taken = pending.popleft().get()
            self.worker_threads[pid] = threads
            self.ledger.add(taken, "preparation workers")
            yield from rows

    def unrendered(self, request):
        """The request as this process prepares it, images and all, for an engine that cannot take
        what a worker rendered (transformers after vLLM failed to start); or a failed Result."""
        if request.rendered is None:
            return request
        return self.builders.row(request.dataset, request.position)

    def requests(self, failures: list, work):
        """Only the Requests; rows that cannot become one go to `failures`."""
        for out in self(work):
            if isinstance(out, Result):
                failures.append(out)
            else:
                yield out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rows_of(dataset, positions=None):
    """(dataset name, position) work for one dataset's rows."""
    positions = range(len(dataset.data)) if positions is None else positions
    return [(dataset.dataset_name, p) for p in positions]


def build_requests(card, dataset, failures: list, workers: int = 0):
    """Requests for every row of one dataset, in order; rows that cannot become one go to `failures`."""
    with Preparer(card, {dataset.dataset_name: dataset}, workers) as preparer:
        yield from preparer.requests(failures, rows_of(dataset))
