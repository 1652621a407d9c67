"""Where each item's CPU time goes: the stages of the data path, and which process pays for each.

On a GPU the model's compute leaves the CPU, and what stays there decides whether the GPU waits. Each
stage is timed with the CPU clock of the thread that runs it (`time.thread_time`), in the process
that runs it: preparation workers send theirs back with their rows. `eval -v` and `bench` show them.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

STAGES = {
    "base64": "decoding the TSV's base64, within the dump (bench measures it apart)",
    "dump": "VLMEvalKit's image dump (base64 decoded, the image written to $LMUData/images)",
    "prompt": "VLMEvalKit's prompt building, its dump aside",
    "open": "opening and converting each image (RGB)",
    "prepare": "the plugin's prepare and the token count",
    "render": "vLLM's multimodal processing and tokenizing (its renderer)",
    "submit": "submission to the engine, its rendering aside",
    "journal": "the journal's checksummed, flushed record",
}


class Costs:
    """CPU seconds and item counts per stage, in one process. A stage timed inside another (the dump
    inside VLMEvalKit's prompt building, vLLM's renderer inside submission) counts as its own stage
    only: the outer one is charged what is left."""

    def __init__(self):
        self.seconds: dict = defaultdict(float)
        self.items: dict = defaultdict(int)
        self._open = threading.local()   # per thread: the CPU seconds of inner stages of each open stage

    @contextmanager
    def stage(self, name: str, items: int = 1):
        inner = self._open.__dict__.setdefault("stack", [])
        inner.append(0.0)
        started = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - started
            self.seconds[name] += spent - inner.pop()
            self.items[name] += items
            if inner:
                inner[-1] += spent

    def take(self) -> dict:
        """What was counted since the last take, as plain data (a worker sends it back with its rows)."""
        out = {k: (self.seconds[k], self.items[k]) for k in self.seconds}
        self.seconds.clear()
        self.items.clear()
        return out


here = Costs()   # this process's: every stage timed in it lands here


class Ledger:
    """Stage costs gathered from every process of a run: name -> process -> (seconds, items)."""

    def __init__(self):
        self.by_stage: dict = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))

    def add(self, taken: dict, process: str) -> None:
        for name, (seconds, items) in taken.items():
            cell = self.by_stage[name][process]
            cell[0] += seconds
            cell[1] += items

    def report(self) -> dict:
        """Per stage: the CPU milliseconds per item, and the process that paid them."""
        out = {}
        for name in [*STAGES, *sorted(set(self.by_stage) - set(STAGES))]:
            for process, (seconds, items) in self.by_stage.get(name, {}).items():
                if items:
                    out.setdefault(name, {})[process] = round(1e3 * seconds / items, 3)
        return out


def lines(report: dict) -> list[str]:
    """The stage costs, one line a stage."""
    return [f"  {name:<8} " + ", ".join(f"{ms:.2f} ms in {process}" for process, ms in where.items())
            + f"   ({STAGES.get(name, name)})" for name, where in report.items()]
