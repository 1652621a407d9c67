"""`--truncate`: an over-long prompt has its text cut to fit and is answered, the cut counted; without
it the item fails with its cause and the others are answered."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from helpers import shape_rows, write_dataset
from vlm_batch.cli import cli

N = 8
LONG = 3                      # the row with a hint far beyond tiny-qwen2-vl's 2048-token context
FILLER = "the weather report says it may rain later today " * 400


def run(tmp_path, name, engine, *extra):
    out = tmp_path / f"{engine}{'-'.join(extra)}"
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-qwen2-vl", "--dataset", name, "--engine", engine,
                                      "--work-dir", str(out), *extra])
    data = pd.read_excel(out / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}.xlsx")
    report = json.loads((out / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}_run.json").read_text())
    return result, dict(zip(data["index"], data["prediction"].astype(str))), report


@pytest.fixture
def long_set(lmudata):
    rows = shape_rows(N, seed=11)
    rows[LONG]["hint"] = FILLER + "Look at the picture."
    return write_dataset(lmudata, "LongHint", rows)


@pytest.mark.engine
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_truncate_answers_the_long_item_and_counts_it(tmp_path, long_set, engine):
    plain, predictions, report = run(tmp_path, long_set, engine)
    assert plain.exit_code == 0, plain.output
    failed = report["failed_items"]
    assert list(failed) == [str(LONG)], failed
    assert "2048" in failed[str(LONG)]      # the cause names the context it exceeds
    assert report["truncated"] == 0
    assert sum(not p.startswith("Failed to obtain answer") for p in predictions.values()) == N - 1

    cut, cut_predictions, cut_report = run(tmp_path, long_set, engine, "--truncate")
    assert cut.exit_code == 0, cut.output
    assert cut_report["failed"] == 0 and cut_report["truncated"] == 1
    assert "truncated 1" in cut.output
    assert not cut_predictions[LONG].startswith("Failed to obtain answer")
    # Prompts that fit are untouched: their answers are the same with and without the flag.
    assert {i: p for i, p in cut_predictions.items() if i != LONG} == \
        {i: p for i, p in predictions.items() if i != LONG}


def test_cut_keeps_the_start_and_the_end():
    from transformers import AutoTokenizer

    from vlm_batch.plugins import get_model
    from vlm_batch.truncate import MARK, cut

    tok = AutoTokenizer.from_pretrained(get_model("tiny-qwen2-vl").path())
    text = "Hint: " + FILLER + "\nQuestion: Which shape?\nA. circle\nB. square\nAnswer with the option's letter."
    message = [{"type": "image", "value": "x.png"}, {"type": "text", "value": text}]
    before = len(tok(text)["input_ids"])
    out = cut(message, 500, tok)
    assert out[0] == message[0]
    kept = out[1]["value"]
    assert kept.startswith("Hint: the weather") and MARK in kept
    assert kept.endswith("B. square\nAnswer with the option's letter.")
    assert len(tok(kept)["input_ids"]) <= before - 500
