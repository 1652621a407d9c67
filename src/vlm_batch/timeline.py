"""Where a run's time goes: consecutive phases of the main thread, so they add up to its wall time.

Work that overlaps the main thread (the engine starting while datasets load, scoring while the
engine generates) is recorded as intervals; the main thread's waits on it are split by them.
"""

from __future__ import annotations

import time


def process_start() -> float:
    """When this process began (epoch seconds): the imports before our first line count too."""
    import psutil

    return psutil.Process().create_time()


class Timeline:
    def __init__(self, start: float | None = None):
        self.start = time.time() if start is None else start
        self.last = self.start
        self.phases: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> float:
        """The time since the previous mark was spent on `name`."""
        at = time.time() if at is None else max(at, self.last)
        self.phases[name] = self.phases.get(name, 0.0) + at - self.last
        self.last = at
        return at

    def wait(self, intervals: list[tuple[str, float, float]], rest: str, at: float | None = None) -> None:
        """A wait until `at`, attributed to what the worker was doing meanwhile (`intervals` of
        (phase, start, end)); time no interval covers goes to `rest`."""
        at = time.time() if at is None else at
        covered = 0.0
        for name, begin, end in intervals:
            overlap = min(end, at) - max(begin, self.last)
            if overlap > 0:
                self.phases[name] = self.phases.get(name, 0.0) + overlap
                covered += overlap
        if at - self.last - covered > 1e-6:
            self.phases[rest] = self.phases.get(rest, 0.0) + at - self.last - covered
        self.last = max(at, self.last)

    @property
    def wall(self) -> float:
        return self.last - self.start

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in self.phases.items()}
