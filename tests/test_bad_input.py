"""Bad input, item by item: each bad row gets a clear error naming it and the cause; the rest runs.

Odd but valid images (CMYK, 16-bit, palette with transparency, grayscale, 1x1, very large) are
converted and answered. Real images made by PIL here, through the real engines.
"""

import random

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import image_b64, shape_rows, write_dataset
from vlm_batch import runner
from vlm_batch.demo import sample_data
from vlm_batch.cli import cli
from vlm_batch.vlmeval import DatasetError

pytestmark = pytest.mark.engine

BAD = {          # index -> what its error must say
    100: "not valid base64",
    101: "not an image",
    102: "truncated or corrupt",
    103: "empty question",
    104: "maximum context length is 2048 tokens",   # vLLM's own words
}
ODD = {110: "cmyk", 111: "16-bit", 112: "palette+transparency", 113: "grayscale", 114: "1x1", 115: "large"}


def odd_image(kind):
    rng = random.Random(kind)
    base = sample_data.draw("circle", "red", rng)
    if kind == "cmyk":
        return image_b64(base.convert("CMYK"), "JPEG")
    if kind == "16-bit":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
        return image_b64(img, "PNG")
    if kind == "palette+transparency":
        pal = base.convert("P", palette=Image.ADAPTIVE, colors=8)
        return image_b64(pal, "PNG", transparency=0)
    if kind == "grayscale":
        return image_b64(base.convert("L"), "PNG")
    if kind == "1x1":
        return image_b64(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    if kind == "large":
        return image_b64(base.resize((6000, 4000)), "PNG")
    raise ValueError(kind)


@pytest.fixture(scope="module")
def bad_dataset():
    from pathlib import Path
    import os

    rows = shape_rows(6, seed=11)
    template = dict(rows[0])
    jpeg = image_b64(sample_data.draw("square", "blue", random.Random(1)), "JPEG")

    def row(index, **changes):
        return {**template, "index": index, **changes}

    rows += [
        row(100, image="@@@ this is not base64 at all, not even close; it only has to be long @@@"),
        row(101, image="aGVsbG8sIHRoaXMgaXMgdGV4dCBhbmQgbm90IGFuIGltYWdlLCBhdCBhbGwsIHJlYWxseSBub3Qh"),
        row(102, image=jpeg[: len(jpeg) // 2 // 4 * 4]),
        row(103, question=""),
        row(104, hint="Read this first. " * 1500),
    ]
    rows += [row(i, image=odd_image(kind)) for i, kind in ODD.items()]
    return write_dataset(Path(os.environ["LMUData"]), "BadInputs", rows)


def check_outcome(summary, xlsx):
    assert set(summary.failed) == set(BAD), summary.failed
    for index, words in BAD.items():
        assert words in summary.failed[index], (index, summary.failed[index])
    data = pd.read_excel(xlsx).set_index("index")
    assert len(data) == 6 + len(BAD) + len(ODD)
    for index, words in BAD.items():
        assert data.loc[index, "prediction"].startswith("Failed to obtain answer: ")
    for index in ODD:   # converted, answered
        assert not str(data.loc[index, "prediction"]).startswith("Failed")
    assert summary.generated == 6 + len(ODD)


def test_bad_rows_fail_alone_through_vllm(vllm_engine, tiny_card, bad_dataset, tmp_path):
    summary = runner.run_eval(tiny_card, bad_dataset, work_dir=str(tmp_path), engine=vllm_engine)
    check_outcome(summary, summary.prediction_file)
    # VLMEvalKit's MCQ evaluator itself cannot take an empty question: said plainly, file kept.
    assert summary.eval_error and "TypeError" in summary.eval_error


def test_bad_rows_fail_alone_through_transformers(tiny_card, bad_dataset, tmp_path):
    BAD_HF = {**BAD, 104: "the model's context is 2048"}   # the transformers engine's own check
    result = CliRunner().invoke(cli, ["eval", "--dataset", bad_dataset, "--engine", "hf", "--work-dir",
                                      str(tmp_path), "--mode", "infer"])
    assert result.exit_code == 0, result.output   # failed items are reported, not fatal
    for index, words in BAD_HF.items():
        assert f"failed item {index}: " in result.output and words in result.output
    assert f"failed {len(BAD)}" in result.output
    scored = CliRunner().invoke(cli, ["eval", "--dataset", bad_dataset, "--work-dir", str(tmp_path),
                                      "--mode", "eval"])
    assert scored.exit_code == 1 and f"evaluation of {bad_dataset} failed (TypeError" in scored.output
    strict = CliRunner().invoke(cli, ["eval", "--dataset", bad_dataset, "--engine", "hf", "--work-dir",
                                      str(tmp_path / "strict"), "--strict", "--mode", "infer"])
    assert strict.exit_code == 1


def test_missing_image_path_file_fails_that_row(tiny_card, vllm_engine, tmp_path, lmudata):
    folder = tmp_path / "pics"
    folder.mkdir()
    rows = shape_rows(3, seed=12)
    for r in rows:
        Image.open(__import__("io").BytesIO(__import__("base64").b64decode(r.pop("image")))).save(
            folder / f"{r['index']}.png")
        r["image_path"] = str(folder / f"{r['index']}.png")
    rows[1]["image_path"] = str(folder / "gone.png")
    name = write_dataset(lmudata, "MissingFiles", rows)
    summary = runner.run_eval(tiny_card, name, work_dir=str(tmp_path), engine=vllm_engine, mode="infer")
    assert list(summary.failed) == [rows[1]["index"]]
    assert "image file not found" in summary.failed[rows[1]["index"]] and "gone.png" in summary.failed[rows[1]["index"]]
    assert summary.generated == 2


def test_tsv_missing_columns_fails_before_any_model(tiny_card, lmudata, monkeypatch, tmp_path):
    import vlm_batch.engines as engines

    rows = [{k: v for k, v in r.items() if k != "question"} for r in shape_rows(3)]
    name = write_dataset(lmudata, "NoQuestion", rows)
    monkeypatch.setattr(engines, "load", lambda *a, **k: pytest.fail("an engine was loaded"))
    with pytest.raises(DatasetError, match="missing required columns: question$"):
        runner.run_eval(tiny_card, name, work_dir=str(tmp_path), engine="vllm")
    result = CliRunner().invoke(cli, ["eval", "--dataset", name, "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: Dataset '{name}' ({lmudata / (name + '.tsv')}) is missing required columns: question")
