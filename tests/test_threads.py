"""The thread budget: each process of a default run computes with the threads it was given, read from
the processes themselves, and photo-sized images go through the whole path."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from helpers import write_dataset
from vlm_batch.demo import photos
from vlm_batch.engines import threads

PHOTOS = 12


def test_workers_follow_the_image_size(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 16)
    small = {"a": SimpleNamespace(data=pd.DataFrame({"image": ["x" * 5_000] * 40}))}
    large = {"a": SimpleNamespace(data=pd.DataFrame({"image": ["x" * 150_000] * 40}))}
    listed = {"a": SimpleNamespace(data=pd.DataFrame({"image": [["x" * 20_000] * 3] * 40}))}
    assert threads.prep_workers(None, small) == 0
    assert threads.prep_workers(None, large) == threads.MAX_WORKERS
    assert threads.prep_workers(None, listed) == threads.MAX_WORKERS   # three images a row add up
    assert threads.prep_workers(3, large) == 3 and threads.prep_workers(0, large) == 0   # the user's say
    monkeypatch.setattr(threads, "cores", lambda: 2)
    assert threads.prep_workers(None, large) == 2


@pytest.mark.engine
def test_a_default_run_on_photos_keeps_each_process_to_its_threads(tmp_path, lmudata):
    """On the CPU, vLLM's engine process gets all cores but one and this process and each preparation
    worker one thread each: torch's default of a thread per core in every process made a run on
    photos 7x slower than VLMEvalKit's loop. 1024x768 JPEGs, as in MMBench or SEED-Bench, go through
    the whole path: VLMEvalKit's dump, decoding, the plugin, vLLM's image processor."""
    name = write_dataset(lmudata, "ThreadPhotos", photos.rows("VLMBatchPhotos", seed=5, n=PHOTOS))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "vlm_batch", "eval", "--dataset", name, "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}_run.json").read_text())
    assert report["engine"]["name"] == "vllm" and report["items"] == PHOTOS and not report["failed"], report["failed_items"]
    seen = report["threads"]
    cores = len(os.sched_getaffinity(0))
    assert seen["cores"] == cores and not seen["user_set"]
    assert seen["this_process"] == 1, seen
    assert len(seen["prep_workers"]) >= 1 and set(seen["prep_workers"].values()) == {1}, seen   # photos: workers
    assert list(seen["engine_processes"].values()) == [max(1, cores - 1)], seen
    predictions = pd.read_excel(tmp_path / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}.xlsx")
    assert len(predictions) == PHOTOS and predictions["prediction"].notna().all()
    assert not predictions["prediction"].astype(str).str.startswith("Failed").any()
    stages = report["stage_cpu_ms_per_item"]   # where each item's CPU went, and which process paid
    for stage in ("dump", "prompt", "open", "prepare"):
        assert set(stages[stage]) == {"preparation workers"}, stages
    for stage in ("submit", "journal"):
        assert set(stages[stage]) == {"this process"}, stages
    assert set(stages["render"]) == {"preparation workers"}, stages   # vLLM's multimodal processing
    assert stages["dump"]["preparation workers"] > stages["prompt"]["preparation workers"]   # photos: the dump weighs
