"""Every way a run ends leaves no process of ours running, says how it ended, and keeps what was
answered: signals as schedulers and shells send them, a dataset that cannot load, a full disk."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import Run, read_trace, shape_rows, wait_for, write_dataset
from vlm_batch.journal import read
from vlm_batch.state import journal_path
from vlm_batch_testing import faults

GONE_S = 15   # how long processes we started may take to go after the run ends


class Family:
    """Every process descended from a run, polled while it runs (its children come and go)."""

    def __init__(self, pid: int):
        self.seen: dict = {}
        self._stop = threading.Event()
        self._root = pid
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(0.05)

    def snapshot(self) -> None:
        """The run's processes now (the test takes one just before it signals, whatever the polling saw)."""
        try:
            for child in psutil.Process(self._root).children(recursive=True):
                proc = self.seen.get(child.pid, (child,))[0]
                try:   # read again each time: a forked process takes its own title after a moment
                    self.seen[child.pid] = (proc, " ".join(child.cmdline()) or child.name())
                except psutil.Error:
                    self.seen.setdefault(child.pid, (proc, "?"))
        except psutil.Error:
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def left_running(self) -> list:
        """Those still running GONE_S seconds after the run ended."""
        self.stop()
        _gone, alive = psutil.wait_procs([proc for proc, _ in self.seen.values()], timeout=GONE_S)
        return [self.seen[p.pid][1] for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def any(self, word: str) -> bool:
        return any(word in what for _, what in self.seen.values())


def _answered(jpath) -> set:
    return set(read(jpath)[1]) if Path(jpath).exists() else set()


def _report(work) -> dict:
    return json.loads((Path(work) / "suite_report.json").read_text())


@pytest.mark.engine
def test_each_signal_stops_the_engine_and_the_same_command_resumes(tmp_path, tiny_card, lmudata):
    """SIGTERM (timeout, docker stop, Slurm), SIGKILL (the OOM killer), SIGINT (Ctrl-C) mid-generation on
    vLLM, and SIGHUP (a closed terminal) on transformers: no process of the run is left (vLLM's engine
    core, the forkserver, the resource tracker), each rerun resumes what the last one answered, and the
    suite report and exit status say how each run ended."""
    name = write_dataset(lmudata, "Signals", shape_rows(2000, seed=31))   # 200 s at ten a second: signalled long before the end
    work = tmp_path / "out"
    jpath = journal_path(str(work), tiny_card.name, name)
    base = ["--dataset", name, "--mode", "infer", "--work-dir", str(work)]
    expected = {signal.SIGTERM: 143, signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGHUP: 129}
    answered = set()
    for k, sig in enumerate(expected):
        engine = ["--engine", "hf"] if sig == signal.SIGHUP else ["--engine", "vllm"]
        proc = Run([*base, *engine], tmp_path / f"trace{k}", {"VLM_BATCH_TEST_DELAY": "0.1"})   # ten a second
        family = Family(proc.pid)
        wait_for(lambda: len(_answered(jpath)) >= len(answered) + 20, proc, timeout=400)
        family.snapshot()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        left = family.left_running()
        assert proc.returncode == expected[sig], (sig, err[-3000:])
        assert not left, (sig, left)
        if sig != signal.SIGHUP:
            assert family.any("VLLM::"), list(family.seen.values())   # vLLM's engine process did run
        assert not set(read_trace(tmp_path / f"trace{k}")) & answered   # what was answered is not asked again
        now = _answered(jpath)
        assert answered < now   # nothing lost, more answered
        answered = now
        if sig != signal.SIGKILL:
            assert f"Interrupted by {sig.name}" in err, err[-2000:]
            ended = _report(work)["ended"]
            assert ended == {"status": "interrupted", "signal": sig.name}, ended
    last = Run([*base, "--engine", "vllm"], tmp_path / "trace_last", {"VLM_BATCH_TEST_DELAY": "0"})
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err[-3000:]
    assert f"resumed {len(answered)}" in out and "failed 0" in out, out
    assert _report(work)["ended"] == {"status": "completed"}


@pytest.mark.engine
def test_a_dataset_that_cannot_load_fails_before_the_engine_or_stops_it(tmp_path, lmudata):
    """An official dataset with no copy here needs a download, which fails offline: that is known before
    any engine starts, so none does. A local file VLMEvalKit's loader rejects is only found while the
    engine starts: the engine process goes at once. Either way one line, and nothing left running."""
    offline = subprocess.Popen([sys.executable, "-m", "vlm_batch", "eval", "--dataset", "MMBench_DEV_EN",
                                "--engine", "vllm", "--work-dir", str(tmp_path / "a")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    family = Family(offline.pid)
    _out, err = offline.communicate(timeout=600)
    assert not family.left_running()
    assert offline.returncode == 2 and "Could not load dataset 'MMBench_DEV_EN'" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err
    assert not family.any("VLLM::") and not family.any("forkserver"), list(family.seen.values())

    rows = shape_rows(8, seed=32)
    broken = write_dataset(lmudata, "BrokenRows", rows)
    with open(lmudata / f"{broken}.tsv", "a") as fh:   # a row with more fields than the header: pandas refuses it
        fh.write("99\t" + "\t".join(["x"] * 40) + "\n")
    late = subprocess.Popen([sys.executable, "-m", "vlm_batch", "eval", "--dataset", "VLMBatchShapes", broken,
                             "--engine", "vllm", "--work-dir", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    family = Family(late.pid)
    _out, err = late.communicate(timeout=600)
    left = family.left_running()
    assert late.returncode == 2 and f"Could not load dataset '{broken}'" in err, err[-2000:]
    assert family.any("forkserver") or family.any("VLLM::"), list(family.seen.values())   # it had started
    assert not left, left
    assert _report(tmp_path / "b")["ended"]["status"] == "failed"


def _mount(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB filesystem for the work dir when this machine lets a test mount one (then grown to 16 MB
    by `grow`); otherwise journals fail as a full disk does through fault injection."""
    where = tmp_path / "disk"
    mounted = _mount(where, "64k")

    def grow():
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(where)], check=True)

    yield where, ({} if mounted else {faults.FULL_DISK: "60000"}), grow
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.engine
def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, tiny_card, lmudata, small_disk):
    where, env, grow = small_disk
    name = write_dataset(lmudata, "FullDisk", shape_rows(1200, seed=33))
    args = ["--dataset", name, "--engine", "hf", "--mode", "infer", "--work-dir", str(where)]
    full = Run(args, tmp_path / "trace0", env)
    out, err = full.communicate(timeout=600)
    jpath = journal_path(str(where), tiny_card.name, name)
    lines = err.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"Error: could not write {jpath}: No space left on device"), err
    assert "rerun the same command to resume" in lines[0]
    kept = _answered(jpath)
    assert 100 < len(kept) < 1200
    grow()
    again = Run(args, tmp_path / "trace1")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed {len(kept)}" in out and "failed 0" in out, out
    clean = Run([*args[:-1], str(tmp_path / "clean")], tmp_path / "trace2")
    assert clean.communicate(timeout=600) and clean.returncode == 0
    import pandas as pd

    resumed = pd.read_excel(where / tiny_card.name / f"{tiny_card.name}_{name}.xlsx")
    uninterrupted = pd.read_excel(tmp_path / "clean" / tiny_card.name / f"{tiny_card.name}_{name}.xlsx")
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_a_work_dir_that_cannot_be_written_fails_before_any_engine(tmp_path):
    where = tmp_path / "readonly"
    if not _mount(where, "1m", "ro"):
        pytest.skip("this machine does not let a test mount a read-only filesystem")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vlm_batch", "eval", "--engine", "vllm", "--work-dir",
                                 str(where)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        family = Family(proc.pid)
        _out, err = proc.communicate(timeout=300)
        assert not family.left_running()
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
        assert "could not write" in err and "Read-only file system" in err, err
        assert not family.any("VLLM::") and not family.any("forkserver"), list(family.seen.values())
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


FORKED = r'''
import multiprocessing as mp, signal
from vlm_batch.ending import stop_on_signals

def handler(_):
    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is signal.SIG_DFL

stop_on_signals()
with mp.get_context("fork").Pool(2) as pool:   # as VLMEvalKit's scoring forks its pools
    print(all(all(r) for r in pool.map(handler, range(4))))
'''


def test_a_forked_process_ends_on_sigterm_as_it_expects():
    """VLMEvalKit's scoring pools are forked from our process: with our SIGTERM handler inherited, a
    worker the pool terminated raised Stopped while waiting on the queue's lock, and the pool's
    shutdown, so the run, hung (seen in CI: VQA scoring beside the transformers engine)."""
    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr
