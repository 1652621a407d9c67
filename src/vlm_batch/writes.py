"""Every file a run writes goes through here, so a write that fails (a full disk, no permission, a
read-only work dir) is one line naming the file and the cause, never a traceback; what was written
before stays as it was, and a rerun resumes from the journal."""

from __future__ import annotations

import contextlib
import os


class WriteError(RuntimeError):
    """A file of the run could not be written; the message names it and why."""


@contextlib.contextmanager
def writing(path, partial: str | None = None):
    """Turn an OSError while writing `path` into a WriteError; `partial` (a temporary file that was to
    replace `path`) is removed, so the file there stays the last complete one."""
    try:
        yield
    except OSError as exc:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.remove(partial)
        raise WriteError(f"could not write {path}: {exc.strerror or exc}") from exc


def check_writable(folder: str) -> None:
    """Before any engine starts: the run can create, write and sync a file in `folder`."""
    probe = os.path.join(folder, f".vlm-batch-write-check-{os.getpid()}")
    with writing(folder):
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        os.remove(probe)
