"""A reaper: watches a process and everything it starts, and when that process is gone (`kill -9`
included) kills whatever of it is left. For processes we start but do not own the code of, such as a
local Ray cluster's agents, which outlive their raylet by a minute or more.

    python -m vlm_batch.engines.reaper PID
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

EVERY_S = 0.5


def reap(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family: dict = {}
    while root.is_running():
        try:
            for child in root.children(recursive=True):
                if child.pid != os.getpid():
                    family.setdefault((child.pid, child.create_time()), child)
        except psutil.Error:
            pass
        time.sleep(EVERY_S)
    for proc in family.values():
        try:
            if proc.is_running():   # the same process: psutil checks its start time
                proc.kill()
        except psutil.Error:
            pass


def start_for_this_process() -> subprocess.Popen:
    """A reaper of this process and its descendants; it ends when this process does."""
    return subprocess.Popen([sys.executable, "-m", "vlm_batch.engines.reaper", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
