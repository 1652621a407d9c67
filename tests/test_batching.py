"""Collector and processor logic (pure; fakes stand in for engines here, and only here)."""

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_batch.engines.collector import TIMEOUT, BatchCollector, collect
from vlm_batch.engines.processor import BatchProcessor, is_oom
from vlm_batch.request import Request, Result


def item(i, images=1, dataset="d", cost=1):
    r = Request(prompt=f"p{i}", max_new_tokens=cost)
    r.index, r.dataset, r.images = i, dataset, [None] * images
    return r


class FakeEngine:
    """Answers f(index); raises a real OOM for batches over `oom_over`, ValueError on `bad` items."""

    def __init__(self, oom_over=None, bad=(), oom_type="torch"):
        self.oom_over, self.bad, self.calls = oom_over, set(bad), []
        self.oom_type = oom_type

    def oom(self):
        if self.oom_type == "torch":
            import torch
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    def run_batch(self, batch):
        self.calls.append([r.index for r in batch])
        if self.oom_over is not None and len(batch) > self.oom_over:
            raise self.oom()
        if any(r.index in self.bad for r in batch):
            raise ValueError("image decoder crashed")
        return [Result(index=r.index, text=f"answer-{r.index}", output_tokens=1) for r in batch]


@given(n=st.integers(0, 60), max_batch=st.integers(1, 16), oom_over=st.one_of(st.none(), st.integers(1, 16)),
       bad=st.sets(st.integers(0, 59), max_size=6), oom_type=st.sampled_from(["torch", "cpu"]))
@settings(max_examples=150, deadline=None)
def test_processor_one_result_per_item_in_order(n, max_batch, oom_over, bad, oom_type):
    engine = FakeEngine(oom_over, bad, oom_type)
    processor = BatchProcessor(engine.run_batch, max_batch=max_batch)
    items = [item(i) for i in range(n)]
    results = [r for k in range(0, n, max_batch) for r in processor.process(items[k:k + max_batch])]
    assert [r.index for r in results] == list(range(n))
    for r in results:
        if r.index in bad:
            assert not r.ok and "ValueError: image decoder crashed" in r.error
        else:   # split and retried results equal what the unsplit batch would have given
            assert r.ok and r.text == f"answer-{r.index}"
    assert processor.metrics.items == n and processor.metrics.failed == len(bad & set(range(n)))
    if oom_over is not None and max_batch > oom_over and n > oom_over:
        assert processor.metrics.splits > 0


@given(n=st.integers(0, 80), max_batch=st.integers(1, 12), budget=st.one_of(st.none(), st.integers(1, 30)),
       shapes=st.lists(st.tuples(st.integers(0, 2), st.sampled_from("ab"), st.integers(1, 8)),
                       min_size=80, max_size=80))
@settings(max_examples=150, deadline=None)
def test_collector_emits_every_item_once_in_like_batches(n, max_batch, budget, shapes):
    collector = BatchCollector(max_batch, timeout_s=1e9, budget=budget, cost=lambda r: r.max_new_tokens)
    items = [item(i, images=s[0], dataset=s[1], cost=s[2]) for i, s in zip(range(n), shapes)]
    batches = [b for r in items for b in collector.add(r)] + collector.drain()
    seen = [r.index for b in batches for r in b]
    assert sorted(seen) == list(range(n))
    for b in batches:
        assert len({r.shape for r in b}) == 1 and 1 <= len(b) <= max_batch
        assert [r.index for r in b] == sorted(r.index for r in b)
        if budget is not None and len(b) > 1:
            assert sum(r.max_new_tokens for r in b) <= budget
    assert collector.stats.items == n


@given(n=st.integers(0, 40), max_batch=st.integers(1, 8), timeout=st.floats(0, 0.005),
       oom_over=st.one_of(st.none(), st.integers(1, 8)), bad=st.sets(st.integers(0, 39), max_size=4))
@settings(max_examples=60, deadline=None)
def test_stream_through_collector_and_processor(n, max_batch, timeout, oom_over, bad):
    engine = FakeEngine(oom_over, bad)
    processor = BatchProcessor(engine.run_batch, max_batch)
    collector = BatchCollector(max_batch, timeout_s=timeout)
    results = [r for batch in collect((item(i, images=i % 2) for i in range(n)), collector)
               for r in processor.process(batch)]
    assert sorted(r.index for r in results) == list(range(n))
    assert all(r.ok == (r.index not in bad) for r in results)


def test_timeout_flushes_partial_batch_while_producer_is_slow():
    produced_second = threading.Event()

    def slow():
        yield item(0)
        time.sleep(0.6)
        produced_second.set()
        yield item(1)

    collector = BatchCollector(max_batch=100, timeout_s=0.05)
    stream = collect(slow(), collector)
    first = next(stream)
    # The first batch arrived by timeout, while the producer was still asleep.
    assert [r.index for r in first] == [0] and not produced_second.is_set()
    assert collector.stats.causes[TIMEOUT] == 1
    assert [r.index for b in stream for r in b] == [1]


def test_producer_error_surfaces_after_formed_batches():
    def broken():
        yield item(0)
        raise KeyError("row 1 unreadable")

    with pytest.raises(KeyError, match="row 1"):
        list(collect(broken(), BatchCollector(max_batch=4, timeout_s=10)))


def test_is_oom_recognises_real_kinds_only():
    import torch

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))   # only real allocator failures count
