"""A guard process: runs a command in a process group of its own, and stops that whole group when
asked (SIGTERM) or when the process that started it is gone, even by `kill -9`.

    python -m vlm_batch.engines.guard PARENT_PID PID_FILE -- COMMAND ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def guard(parent: int, pid_file: str, argv: list[str]) -> int:
    """Run the command; stop it (its whole group) when asked, or when `parent` is gone."""
    child = subprocess.Popen(argv)
    Path(pid_file).write_text(str(child.pid))

    def stop(*_):
        try:
            child.terminate()
            child.wait(10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle; it stops us
    while child.poll() is None:
        if os.getppid() != parent:
            stop()
        time.sleep(0.5)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the command is gone: whatever it left goes too
    os.killpg(0, signal.SIGTERM)
    return child.returncode


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[3] == "--":
        sys.exit(guard(int(sys.argv[1]), sys.argv[2], sys.argv[4:]))
    sys.exit("usage: python -m vlm_batch.engines.guard PARENT_PID PID_FILE -- COMMAND ...")
