"""Faults a test injects into a `vlm-batch` process it starts: set an environment variable, and
`install()` (run before the command, see tests/helpers.py) arms the fault named there."""

from __future__ import annotations

import os
import time
from pathlib import Path

STALL_JOURNAL = "VLM_BATCH_TEST_STALL_JOURNAL"   # stall inside the Nth record a journal writes
FULL_DISK = "VLM_BATCH_TEST_FULL_DISK"           # journals hit "No space left on device" after N bytes


def stall_journal(at: int) -> None:
    """A journal's `at`-th write puts half its record on disk, marks `JOURNAL.stalled` and hangs for
    600 s: a kill then lands inside a write, leaving a torn record."""
    from vlm_batch.journal import Journal

    write, counts = Journal._write, {}

    def stalling(self, data: bytes) -> None:
        counts[self.path] = counts.get(self.path, 0) + 1
        if counts[self.path] == at:
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            Path(str(self.path) + ".stalled").touch()
            time.sleep(600)
        write(self, data)

    Journal._write = stalling


def full_disk(limit: int) -> None:
    """Journals' files fail as a full disk does once `limit` bytes are written to them (for machines
    where a test cannot mount a small filesystem)."""
    import errno

    from vlm_batch.journal import Journal

    opened, written = Journal.__init__, {"bytes": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data: bytes) -> int:
            written["bytes"] += len(data)
            if written["bytes"] > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def init(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self.fh = Full(self.fh)

    Journal.__init__ = init


def install() -> None:
    """Arm the faults this process's environment names."""
    if os.environ.get(STALL_JOURNAL):
        stall_journal(int(os.environ[STALL_JOURNAL]))
    if os.environ.get(FULL_DISK):
        full_disk(int(os.environ[FULL_DISK]))
