"""BatchProcessor: runs batches on an engine and returns exactly one Result per item, in order.

Out of memory splits the batch in half, recursively, down to single items; any other failure
retries the batch's items one at a time, so one bad item costs only itself. Greedy decoding makes
split results equal to the unsplit batch's.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from ..request import Result

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """A real out-of-memory: torch's OutOfMemoryError (CUDA), MemoryError, or the CPU allocator's."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")   # never import torch just to ask
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


@dataclass
class Metrics:
    items: int = 0
    failed: int = 0
    batches: int = 0               # batches the engine actually ran
    batch_items: int = 0
    splits: int = 0                # OOM halvings
    fallbacks: int = 0             # batches retried one item at a time
    output_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    max_batch: int = 0

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def fill(self) -> float:
        return self.batch_items / (self.batches * self.max_batch) if self.batches and self.max_batch else 0.0

    def as_dict(self) -> dict:
        return {"items": self.items, "failed": self.failed, "batches": self.batches, "splits": self.splits,
                "fallbacks": self.fallbacks, "items_per_s": round(self.items_per_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 3), "batch_fill": round(self.fill, 3)}


class BatchProcessor:
    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 0):
        """`run_batch(requests)` returns one Result per request, in order, or raises."""
        self.run_batch = run_batch
        self.metrics = Metrics(max_batch=max_batch)

    def process(self, batch: list) -> list[Result]:
        started = time.perf_counter()
        results = self._run(batch)
        m = self.metrics
        m.seconds += time.perf_counter() - started
        m.items += len(results)
        m.failed += sum(not r.ok for r in results)
        m.output_tokens += sum(r.output_tokens for r in results)
        m.prompt_tokens += sum(r.prompt_tokens for r in results)
        return results

    def _call(self, batch: list) -> list[Result]:
        results = list(self.run_batch(batch))
        if len(results) != len(batch):
            raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
        self.metrics.batches += 1
        self.metrics.batch_items += len(batch)
        return results

    def _run(self, batch: list) -> list[Result]:
        try:
            return self._call(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [Result.failed(batch[0].index, exc, batch[0].dataset)]
            if is_oom(exc):
                self.metrics.splits += 1
                half = len(batch) // 2
                return self._run(batch[:half]) + self._run(batch[half:])
            self.metrics.fallbacks += 1
            return [self._single(item) for item in batch]

    def _single(self, item) -> Result:
        try:
            return self._call([item])[0]
        except Exception as exc:
            if is_oom(exc):
                return Result.failed(item.index, f"out of memory even alone: {type(exc).__name__}: {exc}", item.dataset)
            return Result.failed(item.index, exc, item.dataset)
