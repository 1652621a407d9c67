"""Rows VLMEvalKit's loader would reject for the whole file fail alone, with their index and cause;
every other row is asked and scored."""

import pandas as pd
import pytest
from click.testing import CliRunner

from helpers import shape_rows, write_dataset
from vlm_batch.cli import cli
from vlm_batch.request import FAIL_MSG

N = 12


@pytest.mark.engine
def test_bad_image_fields_fail_alone(tmp_path, lmudata):
    pwned = tmp_path / "pwned"
    rows = shape_rows(N, seed=21)
    rows[1]["image"] = "garbage"                                   # short: taken for a row's index
    rows[4]["image"] = "999"                                       # the index of a row that is not there
    rows[6]["image"] = ""                                          # empty
    rows[8]["image"] = f"[__import__('os').system('touch {pwned}')]"   # a list VLMEvalKit would eval
    rows[10]["image"] = "2"                                        # a good reference: row 2's image
    bad = {1: "neither base64 nor the index", 4: "neither base64 nor the index", 6: "empty",
           8: "not a list of base64 images"}
    name = write_dataset(lmudata, "BadRows", rows)
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-qwen2-vl", "--dataset", name, "--engine", "hf",
                                      "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"generated {N - len(bad)}, resumed 0, failed {len(bad)}" in result.output
    data = pd.read_excel(tmp_path / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}.xlsx")
    predictions = dict(zip(data["index"], data["prediction"].astype(str)))
    assert sorted(predictions) == list(range(N))                   # the failed rows are kept
    for index, cause in bad.items():
        assert predictions[index].startswith(FAIL_MSG) and cause in predictions[index], predictions[index]
        assert f"failed item {index}: ItemError" in result.output
    assert all(not p.startswith(FAIL_MSG) for i, p in predictions.items() if i not in bad)
    assert "score:" in result.output
    assert not pwned.exists()
