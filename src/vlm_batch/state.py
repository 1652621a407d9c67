"""What a run leaves on disk while it works: journals, earlier answers, and the lock that keeps two runs
of the same model and dataset from writing one journal.

Everything lives beside VLMEvalKit's files, in `WORK_DIR/MODEL/.vlm-batch/`, a folder its resume logic
never reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time

from .journal import read
from .writes import writing
from .vlmeval import DatasetError, files

log = logging.getLogger(__name__)
HEARTBEAT_S = 10          # a lock's holder touches it this often
STALE_S = 60              # a lock untouched this long, from another machine, belongs to a dead run
WAIT_POLL_S = 1.0


def state_dir(work_dir: str, model: str) -> str:
    return os.path.join(files.pred_root(work_dir, model), ".vlm-batch")


def journal_path(work_dir: str, model: str, dataset: str, ranks=None) -> str:
    """One per rank, so ranks never share a file."""
    shard = f".rank{ranks.rank}of{ranks.world_size}" if ranks is not None and ranks.distributed else ""
    return os.path.join(state_dir(work_dir, model), f"{model}_{dataset}{shard}.journal")


def journal_files(work_dir: str, model: str, dataset: str) -> list[str]:
    """Every journal of this model and dataset: the single-process one and any rank's, of any world size."""
    folder = state_dir(work_dir, model)
    pattern = re.compile(re.escape(f"{model}_{dataset}") + r"(\.rank\d+of\d+)?\.journal")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if pattern.fullmatch(n)]


def load_progress(work_dir: str, model: str, dataset_name: str, own: str | None = None) -> tuple[dict, dict]:
    """(earlier answers, journal records) for this model and dataset; failed answers are retried.

    Every journal counts, so a run resumes what any earlier run left, whatever its number of ranks;
    `own` (this run's journal) is read last, so its records win.
    """
    own = own or journal_path(work_dir, model, dataset_name)
    paths = [p for p in journal_files(work_dir, model, dataset_name) if p != own] + [own]
    answers = files.previous_predictions(work_dir, model, dataset_name)
    records: dict = {}
    for path in paths:
        header, found = read(path)
        if header and (header.get("model"), header.get("dataset")) != (model, dataset_name):
            raise DatasetError(f"{path} belongs to {header.get('model')} on {header.get('dataset')}")
        records.update(found)
        answers.update({k: r["prediction"] for k, r in found.items() if "error" not in r})
    return answers, records


def forget(work_dir: str, model: str, dataset_name: str) -> None:
    """The answers now live in the prediction file: drop the run's state (journals, VLMEvalKit's
    pickles), as VLMEvalKit does after merging."""
    for path in files.vlmeval_state_files(work_dir, model, dataset_name) + journal_files(work_dir, model,
                                                                                          dataset_name):
        os.remove(path)


# -- who is running this model and dataset ----------------------------------------------------------

class Locked(RuntimeError):
    """Another run holds this model and dataset."""


def _alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 1.0   # not a reused pid
    except psutil.Error:
        return False


def run_id() -> str:
    """This process. Under torchrun only rank 0 takes locks, for its whole run."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time()}"


class RunLock:
    """`MODEL_DATASET.lock`: the run that holds it, refreshed while it runs.

    The file is created with O_EXCL, so of two runs starting at once one wins. A lock whose holder
    is gone is taken over: on this machine, when its process no longer exists; from another machine
    (a shared work dir), when it has not been refreshed for STALE_S seconds. Taking over renames the
    stale file away first, which only one run can do.
    """

    def __init__(self, work_dir: str, model: str, dataset: str, run: str | None = None):
        self.path = os.path.join(state_dir(work_dir, model), f"{model}_{dataset}.lock")
        self.model, self.dataset = model, dataset
        self.run = run or run_id()
        self.held = False

    def holder(self) -> dict | None:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):   # being written this instant, or torn by a crash
            return {"torn": True}

    def _stale(self, holder: dict) -> bool:
        if holder.get("torn"):
            try:
                return time.time() - os.stat(self.path).st_mtime > STALE_S
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder["pid"]), holder.get("started"))
        try:
            return time.time() - os.stat(self.path).st_mtime > STALE_S
        except FileNotFoundError:
            return True

    def _create(self) -> bool:
        import psutil

        with writing(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            me = psutil.Process()
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump({"run": self.run, "pid": os.getpid(), "host": socket.gethostname(),
                               "started": me.create_time(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "command": " ".join(me.cmdline()[:12])}, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError:
                os.remove(self.path)   # half a lock would look torn, then stale, to the next run
                raise
        return True

    def try_acquire(self) -> dict | None:
        """None when this run now holds the lock (or its run already did); else the holder."""
        for _ in range(3):
            if self._create():
                self.held = True
                return None
            holder = self.holder()
            if holder is None:
                continue                      # released meanwhile: try again
            if holder.get("run") == self.run:
                return None                   # this process holds it already
            if not self._stale(holder):
                return holder
            aside = f"{self.path}.stale-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.rename(self.path, aside)   # only one run wins this rename
            except FileNotFoundError:
                continue
            log.warning("%s on %s: taking over the lock of run %s (pid %s on %s), which is gone",
                        self.model, self.dataset, holder.get("run"), holder.get("pid"), holder.get("host"))
            os.remove(aside)
        return self.holder() or {"pid": "?", "host": "?"}

    def acquire(self, wait: bool = False) -> "RunLock":
        said = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self
            if not wait:
                raise Locked(f"{self.model} on {self.dataset} is being run by PID {holder.get('pid')} on "
                             f"{holder.get('host')} (since {holder.get('since', '?')}); wait for it to finish, "
                             f"or pass --wait to start when it has")
            if not said:
                log.info("waiting for PID %s on %s, which runs %s on %s", holder.get("pid"), holder.get("host"),
                         self.model, self.dataset)
                said = True
            time.sleep(WAIT_POLL_S)

    def touch(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self.holder()
            if holder and holder.get("run") == self.run:
                os.remove(self.path)


class Locks:
    """The locks of one model's datasets, refreshed by one heartbeat thread until released."""

    def __init__(self):
        self.locks: list[RunLock] = []
        self._stop = threading.Event()
        self._thread = None

    def take(self, lock: RunLock, wait: bool = False) -> RunLock:
        self.locks.append(lock.acquire(wait))
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="vlm-batch-lock-heartbeat", daemon=True)
            self._thread.start()
        return lock

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for lock in list(self.locks):
                lock.touch()

    def release(self, lock: RunLock) -> None:
        lock.release()
        if lock in self.locks:
            self.locks.remove(lock)

    def release_all(self) -> None:
        self._stop.set()
        for lock in self.locks:
            lock.release()
        self.locks = []
