"""Progress for the long phases: shown on a terminal, silent in logs and pipes."""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


def quiet_when_piped() -> None:
    """VLMEvalKit and vLLM draw tqdm bars of their own; without a terminal they are only noise."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def bar(total: int, desc: str, position: int = 0):
    """A tqdm bar with items/s and ETA, or a no-op one when nobody is watching."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", position=position, leave=True, dynamic_ncols=True,
                disable=not interactive(), smoothing=0.1)


def counted(items, progress):
    """Pass items through, counting each on `progress`."""
    for item in items:
        progress.update(1)
        yield item


class SuiteProgress:
    """Two bars: the whole suite (every model's rows still to answer) and the dataset now answering;
    drawn from the first model's start on, so a run refused before that draws none."""

    def __init__(self):
        self.suite = None
        self.current = None
        self.dataset = None
        self.totals: dict = {}

    def model(self, name: str, items: int, per_dataset: dict | None = None) -> None:
        self.suite = self.suite or bar(0, "suite", 0)
        self.suite.total = (self.suite.total or 0) + items
        self.suite.set_description_str(f"suite ({name})", refresh=False)
        self.suite.refresh()
        self.totals = dict(per_dataset or {})

    def advance(self, dataset: str) -> None:
        if dataset != self.dataset:
            if self.current is not None:
                self.current.close()
            self.dataset = dataset
            self.current = bar(self.totals.get(dataset, 0), dataset, 1)
        self.current.update(1)
        self.suite.update(1)

    def note(self, text: str) -> None:
        """Batch statistics beside the dataset's bar (with --verbose)."""
        if self.current is not None and text:
            self.current.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if self.suite is not None:
            self.suite.close()


def brief(stats: dict) -> str:
    """Batch statistics for the progress line."""
    if "window" in stats:
        w = stats["window"]
        return f"in flight {w['mean_in_flight']}/{w['size']}, steps {w['steps']}"
    if "processor" in stats:
        p = stats["processor"]
        return f"batches {p['batches']}, fill {p['batch_fill']:.2f}, splits {p['splits']}, fallbacks {p['fallbacks']}"
    return ""
