"""The journal: every finished item, on disk before the run moves on, readable after a kill at any byte.

One line per record: an 8-digit hex CRC32 of the JSON that follows, a space, the JSON, a newline.
A line without its newline or whose checksum fails is a torn write: it is dropped on reading. Each
record is written and flushed at once (a killed process loses nothing it reported); fsync runs per
small group, so a machine crash loses at most that group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from pathlib import Path

from .request import item_key as key   # the journal's spelling of an index
from .writes import WriteError, writing

log = logging.getLogger(__name__)

FORMAT = 1
SYNC_EVERY = 16          # records
SYNC_SECONDS = 1.0


def _line(record: dict) -> bytes:
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def read(path) -> tuple[dict | None, dict]:
    """(header, records by index); torn or corrupt lines are dropped, the last record of an index wins."""
    path = Path(path)
    if not path.exists():
        return None, {}
    *lines, tail = path.read_bytes().split(b"\n")
    header, records, dropped = None, {}, int(bool(tail))   # an unterminated last line is torn
    for raw in lines:
        body = raw[9:]
        if len(raw) < 10 or raw[8:9] != b" " or raw[:8] != b"%08x" % zlib.crc32(body):
            dropped += 1
            continue
        record = json.loads(body)
        if "journal" in record:
            header = record
        else:
            records[key(record["index"])] = record
    if dropped:
        log.warning("journal %s: dropped %d torn or corrupt record(s)", path, dropped)
    return header, records


class Journal:
    def __init__(self, path, header: dict):
        self.path = Path(path)
        self.failed = False    # a write failed: what is on disk ends at the last whole record, or is torn
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair()
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self.fh = open(self.path, "ab")
        self.unsynced, self.synced_at = 0, time.monotonic()
        if fresh:
            self._write(_line({"journal": FORMAT, **header}))
            self.sync()

    def _repair(self) -> None:
        """Cut a torn last line, so new records do not append to half a record."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)

    def _write(self, data: bytes) -> None:
        with self._failing():
            self.fh.write(data)
            self.fh.flush()

    @contextlib.contextmanager
    def _failing(self):
        try:
            with writing(self.path):
                yield
        except WriteError:
            self.failed = True
            raise

    def append(self, result) -> None:
        record = {"index": key(result.index), "prediction": result.prediction}
        if result.error is not None:
            record["error"] = result.error
        if result.output_tokens:
            record["tokens"] = [result.prompt_tokens, result.output_tokens]
        self._write(_line(record))
        self.unsynced += 1
        if self.unsynced >= SYNC_EVERY or time.monotonic() - self.synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        with self._failing():
            os.fsync(self.fh.fileno())
        self.unsynced, self.synced_at = 0, time.monotonic()

    def close(self) -> None:
        if self.fh.closed:
            return
        if self.failed:   # its error is already on its way; a torn last record is cut on the next open
            with contextlib.suppress(OSError):
                self.fh.close()
            return
        self.sync()
        self.fh.close()
