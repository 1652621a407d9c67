"""The embedded model really answers: the shipped weights score well on rows they were not trained
on, and retraining from the script (same seed) gives a model in the same accuracy band."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from vlm_batch import runner

from vlm_batch.demo import sample_data
from vlm_batch.vlmeval.datasets import load_dataset

pytestmark = pytest.mark.engine
BAND = 0.9   # the bar: at least 90% on the sample set, which training never sees


def overall(summary) -> dict:
    row = summary.score.iloc[0]
    return {k: float(v) for k, v in row.items() if k != "split"}


def fraction(summary) -> float:
    """VLMEvalKit's Overall as a fraction (its Y/N and VQA scores are percentages)."""
    per_cent = type(summary_dataset(summary)).__name__ in ("ImageYORNDataset", "ImageVQADataset")
    return overall(summary)["Overall"] / (100 if per_cent else 1)


def summary_dataset(summary):

    return load_dataset(summary.dataset, 1)


@pytest.mark.parametrize("name", list(sample_data.SETS))
def test_shipped_model_answers_every_sample_set(tiny_card, tmp_path, name):
    summary = runner.run_eval(tiny_card, name, work_dir=str(tmp_path), engine="hf")
    print(f"shipped {name}: {fraction(summary):.3f}")
    assert fraction(summary) >= BAND, (name, overall(summary))


def test_shipped_model_answers_the_sample_set(tiny_card, tmp_path):
    from vlm_batch_qwen2_vl import TRAINED

    summary = runner.run_eval(tiny_card, "VLMBatchShapes", work_dir=str(tmp_path), engine="hf")
    scores = overall(summary)
    assert scores["Overall"] >= BAND and min(scores["shape"], scores["colour"]) >= 0.8, scores
    size = sum(p.stat().st_size for p in TRAINED.iterdir())
    assert size <= 10 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLM_BATCH_FULL_RETRAIN"),
                    reason="ten minutes of training (587 s of the suite's 2053 s in CI); run it with "
                           "VLM_BATCH_FULL_RETRAIN=1 nox -s tests -- -k retraining")
def test_retraining_from_the_script_lands_in_the_same_band(tiny_card, tmp_path):
    out = tmp_path / "retrained"
    done = subprocess.run([sys.executable, "-m", "vlm_batch_testing.train_qwen2_vl", "--out", str(out), "--seed", "0"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3000
    print(f"retrained in {report['seconds']:.0f}s")   # the budget is ten minutes on 2 cores; not asserted
    retrained = dataclasses.replace(tiny_card, checkpoint=str(out))
    for name in sample_data.SETS:   # every kind: multiple choice, Y/N, open answer, several images
        summary = runner.run_eval(retrained, name, work_dir=str(tmp_path / "eval"), engine="hf")
        print(f"retrained {name}: {fraction(summary):.3f}")
        assert fraction(summary) >= BAND, (name, overall(summary))
