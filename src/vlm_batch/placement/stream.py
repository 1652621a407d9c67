"""Requests through an engine, as every placement runs them: by way of the family's generate hook, and
with the one restart loop (an engine that dies is started again and given what it had not answered)."""

from __future__ import annotations

import logging

from ..engines import EngineError
from ..plugins import hooks
from ..request import Result

log = logging.getLogger(__name__)
RESTARTS = 1        # an engine that dies is restarted this many times per model
HEAD = 256          # requests prepared while the engine is still starting


def generate(card, engine, requests):
    """Every request through the engine by way of the family's generate hook, as results finish."""
    cut = {}   # the requests --truncate cut: their results say so, for the report

    def noted():
        for request in requests:
            if request.truncated:
                cut[request.key] = request.truncated
            yield request

    for result in hooks(card).generate(engine, noted()):
        result.truncated = cut.pop(result.key, None)
        if not result.ok:
            log.warning("item %s of %s failed: %s", result.index, result.dataset, result.error)
        yield result


def answered(card, start, requests, *, failures: list | None = None, restarts: int = RESTARTS,
             on_restart=None, unrendered=None):
    """Results for `requests` as they finish, through `start`'s engine (an `engines.start.EngineStart`).

    While the engine starts, up to HEAD requests are prepared. Items that failed before generation
    (`failures`, filled as `requests` is read) come back as they appear. An engine that dies is
    restarted up to `restarts` times (only one this run owns) and given the requests it had taken
    but not answered. A worker-rendered request the engine cannot take as it is (transformers after
    vLLM failed to start, or one sent to an engine that died) goes through `unrendered` first, which
    prepares it again, images and all."""
    failures = [] if failures is None else failures
    taken: dict = {}     # request key -> request, handed to the engine, unanswered
    source = iter(requests)
    redo: list = []
    attempt = 0

    def feed(first):
        for request in _chain(first, source):
            taken[request.key] = request
            yield request

    while True:
        stream = feed(redo)
        head = []
        while not start.ready() and len(head) < HEAD:   # prepare while the engine starts
            request = next(stream, None)
            if request is None:
                break
            head.append(request)
        engine = start.get()
        try:
            for result in generate(card, engine, _usable(engine, _chain(head, stream), unrendered, failures)):
                while failures:
                    yield failures.pop(0)
                taken.pop(result.key, None)
                yield result
            while failures:
                yield failures.pop(0)
            return
        except EngineError as exc:
            if not start.owned or attempt >= restarts:
                raise
            attempt += 1
            redo = list(taken.values())
            taken.clear()
            log.error("%s; restarting the engine for the %d rows in flight", exc, len(redo))
            if on_restart:
                on_restart(exc)
            start.restart()


def _usable(engine, requests, unrendered, failures: list):
    """The requests as `engine` can take them: a rendering it cannot take is replaced by the row
    prepared again."""
    takes = getattr(engine, "takes", lambda request: False)
    for request in requests:
        if request.rendered is not None and not takes(request) and unrendered is not None:
            request = unrendered(request)
            if isinstance(request, Result):   # it could not be prepared again
                failures.append(request)
                continue
        yield request


def _chain(first, rest):
    yield from first
    yield from rest
