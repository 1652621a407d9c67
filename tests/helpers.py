"""Builders of small VLMEvalKit-format data for tests."""

from __future__ import annotations

import random

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlm_batch.demo import sample_data


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


def shape_rows(n: int, seed: int = 3, first: int = 0):
    """Sample-set rows for tests that need their own dataset; indices from `first` on."""
    rows = sample_data.rows(n, seed=seed)
    for i, row in enumerate(rows):
        row["index"] = first + i
    return rows


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
                    fh.write(f"{request.dataset}\t{request.index}\n")
                    fh.flush()
                    time.sleep(float(os.environ.get("VLM_BATCH_TEST_DELAY", 0)))   # a slower model
                    yield request
        return engine.generate(traced())

pm.register(Trace(), name="trace")
from vlm_batch_testing import faults
faults.install()
from vlm_batch.cli import main
sys.argv[0] = "vlm-batch"
main()   # as the console script runs: its signal handling, its exit status
'''


def read_trace(path, dataset: str | None = None) -> list[int]:
    """The indices the engine was given, in order (of one dataset, if named)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        pairs = [line.rsplit("\t", 1) for line in fh.read().splitlines() if line]
    return [int(i) for d, i in pairs if dataset is None or d == dataset]


def _interruptible():
    """Ctrl-C reaches the run as it does from a terminal, even when the suite itself was started in
    the background by a shell without job control, which starts it with SIGINT ignored (inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run(subprocess.Popen):
    """A traced `vlm-batch eval` subprocess whose output goes to files: a pipe nobody reads while the
    test waits could fill up and stall the run."""

    started: list = []

    def __init__(self, args, trace, env_extra=None):
        # the trained tiny model answers a few hundred items a second: slow it to a real model's pace
        # so that the kills land mid-run
        env = dict(os.environ, VLM_BATCH_TEST_TRACE=str(trace), VLM_BATCH_TEST_DELAY="0.02")
        env.update(env_extra or {})
        self.out, self.err = Path(f"{trace}.out"), Path(f"{trace}.err")
        with self.out.open("w") as out, self.err.open("w") as err:
            super().__init__([sys.executable, "-c", TRACED_CLI, "eval", *args], env=env, stdout=out, stderr=err,
                             preexec_fn=_interruptible)
        Run.started.append(self)

    def communicate(self, input=None, timeout=None):
        self.wait(timeout)
        return self.out.read_text(), self.err.read_text()


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")
