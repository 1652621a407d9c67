"""BatchCollector: turns a stream of requests into batches of like requests.

A batch leaves when it is full (by count or by memory), when `timeout_s` has passed since its
first request (so a slow producer never stalls the engine), or when the stream ends. Requests
are grouped by a key (dataset and image count; the transformers engine adds a length bucket),
so one batch never mixes shapes the engine would have to pad or reject.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator

FULL, MEMORY, TIMEOUT, END = "full", "memory", "timeout", "end"


@dataclass
class CollectorStats:
    batches: int = 0
    items: int = 0
    causes: Counter = field(default_factory=Counter)

    def record(self, size: int, cause: str) -> None:
        self.batches += 1
        self.items += size
        self.causes[cause] += 1

    def fill(self, max_batch: int) -> float:
        """Mean batch size over the largest allowed: 1.0 means every batch left full."""
        return self.items / (self.batches * max_batch) if self.batches else 0.0


@dataclass
class _Group:
    started: float
    items: list = field(default_factory=list)
    cost: int = 0


class BatchCollector:
    def __init__(self, max_batch: int, timeout_s: float = 0.05, *,
                 key: Callable[[object], Hashable] = lambda r: r.shape,
                 budget: int | None = None, cost: Callable[[object], int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch, self.timeout_s, self.key = max_batch, timeout_s, key
        self.budget, self.cost, self.clock = budget, cost or (lambda r: 0), clock
        self.groups: dict[Hashable, _Group] = {}
        self.stats = CollectorStats()

    def _emit(self, key, cause: str) -> list:
        group = self.groups.pop(key)
        self.stats.record(len(group.items), cause)
        return group.items

    def add(self, item) -> list[list]:
        """Take one request; return the batches it completed (zero, one or, via memory, two)."""
        key, cost, out = self.key(item), self.cost(item), []
        group = self.groups.get(key)
        if group and self.budget is not None and group.cost + cost > self.budget:
            out.append(self._emit(key, MEMORY))   # this request would overflow: send what fits
            group = None
        if group is None:
            group = self.groups[key] = _Group(started=self.clock())
        group.items.append(item)
        group.cost += cost
        if len(group.items) >= self.max_batch:
            out.append(self._emit(key, FULL))
        return out

    def due(self) -> list[list]:
        """Batches whose first request has waited `timeout_s`."""
        now = self.clock()
        late = [k for k, g in self.groups.items() if now - g.started >= self.timeout_s]
        return [self._emit(k, TIMEOUT) for k in late]

    def next_deadline(self) -> float | None:
        if not self.groups:
            return None
        return min(g.started for g in self.groups.values()) + self.timeout_s

    def drain(self) -> list[list]:
        return [self._emit(k, END) for k in list(self.groups)]


_DONE = object()


def collect(source: Iterable, collector: BatchCollector, prefetch: int = 256) -> Iterator[list]:
    """Batches from `source`, which runs in a thread so that its slowness only shortens batches.

    An exception in `source` is re-raised here after the batches already formed are yielded.
    """
    buffer: queue.Queue = queue.Queue(maxsize=prefetch)
    failure: list[BaseException] = []
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            failure.append(exc)
        finally:
            put(_DONE)

    thread = threading.Thread(target=produce, name="vlm-batch-producer", daemon=True)
    thread.start()
    try:
        while True:
            deadline = collector.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - collector.clock())
            try:
                item = buffer.get(timeout=wait)
            except queue.Empty:
                yield from collector.due()
                continue
            if item is _DONE:
                break
            yield from collector.add(item)
            yield from collector.due()
        yield from collector.drain()
        if failure:
            raise failure[0]
    finally:
        stop.set()
