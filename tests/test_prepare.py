"""Preparing requests in a forked pool gives exactly what in-process preparation gives, in order."""

from helpers import write_dataset
from vlm_batch.demo import sample_data
from vlm_batch.prepare import Preparer, rows_of
from vlm_batch.vlmeval.datasets import load_dataset


def test_pool_prepares_the_same_requests_in_order(tiny_card, lmudata):
    rows = sample_data.rows(30, seed=5)
    rows[7]["image"] = "bm90IGFuIGltYWdl" * 8   # base64 of text: that row must fail, alone
    write_dataset(lmudata, "PrefetchSet", rows)
    dataset = load_dataset("PrefetchSet")
    serial_failures, pooled_failures = [], []
    with Preparer(tiny_card, {dataset.dataset_name: dataset}, workers=0) as serial:
        expected = list(serial.requests(serial_failures, rows_of(dataset)))
    with Preparer(tiny_card, {dataset.dataset_name: dataset}, workers=2) as pooled:
        assert pooled.workers == 2
        got = list(pooled.requests(pooled_failures, rows_of(dataset)))
    assert [r.index for r in got] == [r.index for r in expected] == [i for i in range(30) if i != 7]
    assert [(r.prompt, r.prompt_tokens, r.memory) for r in got] == \
        [(r.prompt, r.prompt_tokens, r.memory) for r in expected]
    assert [[im.tobytes() for im in r.images] for r in got] == [[im.tobytes() for im in r.images] for r in expected]
    assert [f.index for f in pooled_failures] == [f.index for f in serial_failures] == [7]
    assert all("not an image" in f.error for f in pooled_failures + serial_failures)
