"""Rows VLMEvalKit's loader would reject for the whole file fail alone, with their index and cause;
a row without an image is dropped, as VLMEvalKit drops it; every other row is asked and scored."""

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
    rows[6]["image"] = ""                                          # no image: VLMEvalKit drops the row
    rows[7]["image"] = " "                                         # blank, not empty: it would fail the file
    rows[8]["image"] = f"[__import__('os').system('touch {pwned}')]"   # a list VLMEvalKit would eval
    rows[10]["image"] = "2"                                        # a good reference: row 2's image
    rows[11]["image"] = "6"                                        # the index of the dropped row
    bad = {1: "neither base64 nor the index", 4: "neither base64 nor the index", 7: "empty",
           8: "not a list of base64 images", 11: "neither base64 nor the index"}
    dropped = {6}
    name = write_dataset(lmudata, "BadRows", rows)
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-qwen2-vl", "--dataset", name, "--engine", "hf",
                                      "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"generated {N - len(bad) - len(dropped)}, resumed 0, failed {len(bad)}" in result.output
    data = pd.read_excel(tmp_path / "tiny-qwen2-vl" / f"tiny-qwen2-vl_{name}.xlsx")
    predictions = dict(zip(data["index"], data["prediction"].astype(str)))
    assert sorted(predictions) == sorted(set(range(N)) - dropped)  # the failed rows are kept
    for index, cause in bad.items():
        assert predictions[index].startswith(FAIL_MSG) and cause in predictions[index], predictions[index]
        assert f"failed item {index}: ItemError" in result.output
    assert all(not p.startswith(FAIL_MSG) for i, p in predictions.items() if i not in bad)
    assert "score:" in result.output
    assert not pwned.exists()


def _no_image_rows(lmudata, name):
    rows = shape_rows(6, seed=4)
    for row in rows:
        row["answer"] = "Yes"
    rows[2]["image"] = ""          # no image
    rows[4]["image"] = "2"         # a reference to it
    return write_dataset(lmudata, name, rows)


def test_rows_without_an_image_as_the_class_handles_them(lmudata):
    """`skip_noimg` on (VLMEvalKit's default): the row is dropped, by VLMEvalKit itself, and a row
    sharing its image fails alone. Off: VLMEvalKit's loader would fail the whole file on it (it takes
    "nan" for a row index), so it fails alone."""
    from vlmeval.dataset import ImageYORNDataset

    from vlm_batch.vlmeval.rows import rows_set_aside

    class KeepsRowsWithoutImage(ImageYORNDataset):
        def __init__(self, dataset, skip_noimg=False):
            super().__init__(dataset, skip_noimg)

    name = _no_image_rows(lmudata, "NoImageRows")
    for cls, dropped, failed in ((ImageYORNDataset, {"2"}, {"4": "neither base64 nor the index"}),
                                 (KeepsRowsWithoutImage, set(), {"2": "empty", "4": "neither base64"})):
        with pytest.raises(AssertionError):   # VLMEvalKit alone: the whole file fails
            cls(name)
        bad = {}
        with rows_set_aside(bad):
            data = cls(name).data
        assert {str(i) for i in data["index"]} == {str(i) for i in range(6)} - dropped, cls
        assert set(bad) == {int(i) for i in failed} and all(failed[str(i)] in bad[i] for i in bad), (cls, bad)

    rows = shape_rows(6, seed=4)
    rows[4]["image"] = ""          # dropped, and nothing refers to it: VLMEvalKit alone drops it too
    write_dataset(lmudata, "NoImageRow", rows)
    bad = {}
    with rows_set_aside(bad):
        ours = ImageYORNDataset("NoImageRow").data
    assert not bad and list(ours["index"]) == list(ImageYORNDataset("NoImageRow").data["index"]) == [0, 1, 2, 3, 5]


def test_a_class_that_fills_rows_without_an_image_is_left_alone():
    """HiPhO (skip_noimg off) puts a long placeholder in the image field of rows without one and asks
    them as text-only questions: nothing is set aside."""
    from vlm_batch.vlmeval.rows import bad_image_fields

    data = pd.DataFrame({"index": [0, 1], "image": ["NO_IMAGE_PLACEHOLDER_" + "x" * 50, "A" * 100]})
    assert bad_image_fields(data, skip_noimg=False) == {}
