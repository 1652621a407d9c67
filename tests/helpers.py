"""Builders of small VLMEvalKit-format data for tests."""

from __future__ import annotations

import random

from vlm_batch import sample_data


def mmbench_rows(n: int = 12, seed: int = 1):
    """MMBench-style rows: hints on some, 2-4 options, a Chinese question, shuffled answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(sample_data.SHAPES), rng.choice(list(sample_data.COLOURS))
        n_opt = 2 + i % 3
        options = rng.sample([s for s in sample_data.SHAPES if s != shape], n_opt - 1) + [shape]
        rng.shuffle(options)
        question = "图中是什么形状？" if i % 5 == 4 else "Which shape is drawn?"
        row = {"index": 1000 + i, "question": question,
               "hint": f"The shape is {colour}." if i % 2 else float("nan"),
               "image": sample_data.encode(sample_data.draw(shape, colour, rng)),
               "answer": "ABCD"[options.index(shape)], "category": "shape", "l2-category": "perception",
               "split": "dev"}
        for letter in "ABCD":
            row[letter] = options["ABCD".index(letter)] if "ABCD".index(letter) < n_opt else float("nan")
        rows.append(row)
    return rows


def write_dataset(root, name: str, rows) -> str:
    sample_data.write_tsv(root / f"{name}.tsv", rows)
    return name


def image_b64(img, fmt: str = "PNG", **save) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def shape_rows(n: int, seed: int = 3):
    """Sample-set rows with fresh indices, for tests that need their own dataset."""
    return sample_data.rows(n, seed=seed)


# Runs the CLI with an in-process plugin that writes each request's index to $VLM_BATCH_TEST_TRACE
# as the engine takes it: the count of engine calls per item, across killed and resumed runs.
TRACED_CLI = r'''
import os, sys, time
from vlm_batch import hookimpl
from vlm_batch.plugins import pm

class Trace:
    @hookimpl(tryfirst=True)
    def vlm_batch_generate(self, card, engine, requests):
        def traced():
            with open(os.environ["VLM_BATCH_TEST_TRACE"], "a") as fh:
                for request in requests:
                    fh.write(f"{request.index}\n")
                    fh.flush()
                    time.sleep(float(os.environ.get("VLM_BATCH_TEST_DELAY", 0)))   # a slower model
                    yield request
        return engine.generate(traced())

pm.register(Trace(), name="trace")
from vlm_batch.cli import cli
cli(sys.argv[1:])
'''


def read_trace(path) -> list[int]:
    import os

    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [int(x) for x in fh.read().split()]
