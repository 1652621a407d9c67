"""What users see: progress on a terminal (and none in a pipe), the run report, the bench chart."""

import fcntl
import json
import os
import pty
import struct
import termios
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def _eval(work, *extra):
    return [sys.executable, "-m", "vlm_batch", "eval", "--engine", "hf", "--limit", "24", "--work-dir",
            str(work), *extra]


def test_progress_on_a_terminal_and_silence_in_a_pipe(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # a 160-column terminal
    # in-process runs earlier in the session may have set TQDM_DISABLE for this process: a user's shell has not
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(_eval(tmp_path / "tty", "--verbose"), stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown[-2000:]
    for shown_bar in ("suite (tiny-qwen2-vl)", "VLMBatchShapes"):   # the whole suite, the dataset now answering
        assert f"{shown_bar}: 100%" in shown, shown[-3000:]
    assert "item/s" in shown and "<00:00" in shown          # speed and ETA
    assert "batches 1, fill" in shown                        # --verbose: batch statistics

    piped = subprocess.run(_eval(tmp_path / "pipe"), capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "item/s" not in piped.stderr + piped.stdout and "%|" not in piped.stderr + piped.stdout


def test_run_report_beside_the_predictions(tmp_path):
    done = subprocess.run(_eval(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / "tiny-qwen2-vl" / "tiny-qwen2-vl_VLMBatchShapes_run.json"
    report = json.loads(path.read_text())
    assert report["engine"]["name"] == "hf" and report["engine"]["args"]["device"] == "cpu"
    for package in ("vlm-batch", "vlm-batch-qwen2-vl", "transformers", "torch", "ms-vlmeval"):
        assert report["versions"][package]
    assert (report["items"], report["generated"], report["resumed"], report["failed"]) == (24, 24, 0, 0)
    assert report["items_per_s"] > 0 and report["tokens_per_s"] > 0 and 0 < report["batch_fill"] <= 1
    assert report["splits"] == 0 and report["fallbacks"] == 0
    assert report["score"][0]["split"] == "dev" and 0 <= report["score"][0]["Overall"] <= 1
    # the phases of the run add up to its wall time, and the run measured from outside is not longer
    assert abs(sum(report["phases_s"].values()) - report["wall_s"]) < 0.05, report["phases_s"]
    assert {"imports", "engine_start", "dataset_load", "first_item", "generation", "shutdown"} <= set(
        report["phases_s"]), report["phases_s"]
    again = subprocess.run(_eval(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "finished by an earlier run" in again.stdout, again.stderr[-2000:]
    assert json.loads(path.read_text()) == report   # reused as VLMEvalKit reuses it: nothing rewritten
    forced = subprocess.run(_eval(tmp_path, "--rerun"), capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    redone = json.loads(path.read_text())
    assert (redone["generated"], redone["resumed"]) == (24, 0) and redone["score"] == report["score"]
