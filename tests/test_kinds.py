"""Datasets beyond single-image multiple choice: the Yes/No, open-answer and multi-image sample sets,
and users' own TSVs of each kind, loaded, prompted and scored by VLMEvalKit's class for that kind."""

import json
import shutil

import pytest
from click.testing import CliRunner

from helpers import write_dataset
from vlm_batch.demo import sample_data
from vlm_batch.cli import cli
from vlm_batch.vlmeval.datasets import KINDS, load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

SETS = {sample_data.YN: "ImageYORNDataset", sample_data.VQA: "ImageVQADataset",
        sample_data.MULTI: "ImageMCQDataset"}
# VLMEvalKit's main scores: a fraction for multiple choice, a percentage for Y/N and VQA.
PER_CENT = {"ImageYORNDataset", "ImageVQADataset"}
MODEL = "tiny-qwen2-vl"


def summary(work_dir) -> dict:
    return {row["dataset"]: row for row in json.loads((work_dir / "summary.json").read_text())}


def rescored(work_dir, name: str) -> float:
    """VLMEvalKit's evaluator, run again on a copy of the prediction file, for its main score."""
    from vlm_batch.report import main_score

    copy = work_dir / "rescore" / f"{MODEL}_{name}.xlsx"
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(work_dir / MODEL / f"{MODEL}_{name}.xlsx", copy)
    dataset = load_dataset(name)
    return main_score(dataset.evaluate(str(copy), model="exact_matching", nproc=1))[1]


@pytest.mark.engine
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_sample_sets_of_every_kind_score_as_vlmevalkit_scores_them(tmp_path, engine):
    result = CliRunner().invoke(cli, ["eval", "--model", MODEL, "--dataset", *SETS, "--engine", engine,
                                      "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = summary(tmp_path)
    for name, cls in SETS.items():
        assert type(load_dataset(name, 2)).__name__ == cls
        row = rows[name]
        assert row["failed"] == 0 and row["items"] == 160, row
        print(f"{engine} {name}: {row['metric']} {row['score']}")
        assert row["score"] == pytest.approx(rescored(tmp_path, name), abs=1e-4)
        assert row["score"] / (100 if cls in PER_CENT else 1) >= 0.9, (name, row)


def test_multi_image_rows_reach_the_engine_with_every_image_in_order(lmudata):
    from qwen_vl_utils import fetch_image

    from vlm_batch.images import open_rgb
    from vlm_batch.plugins import get_model
    from vlm_batch.prepare import build_requests

    card = get_model(MODEL)
    dataset = load_dataset(sample_data.MULTI, 8)
    failures = []
    requests = list(build_requests(card, dataset, failures))
    assert not failures and len(requests) == 8
    build = prompt_builder(card, dataset)
    for request, (_, line) in zip(requests, dataset.data.iterrows()):
        paths = [p["value"] for p in build(line) if p["type"] == "image"]
        assert len(paths) == len(line["image"]) in (2, 3)
        expected = [fetch_image({"image": open_rgb(p), **card.options}) for p in paths]
        assert [im.tobytes() for im in request.images] == [im.tobytes() for im in expected]
        assert request.prompt.count("<|image_pad|>") == len(paths)


def user_sets(lmudata, n=16):
    write_dataset(lmudata, "MyYesNo", sample_data.yn_rows(n, seed=5))
    write_dataset(lmudata, "MyOpen", sample_data.vqa_rows(n, seed=6))
    write_dataset(lmudata, "MyChoice", sample_data.multi_rows(n, seed=7))
    return {"MyYesNo": "yorn", "MyOpen": "vqa", "MyChoice": "mcq"}


@pytest.mark.engine
def test_users_tsvs_of_each_kind_by_kind_and_by_config_class(tmp_path, lmudata):
    kinds = user_sets(lmudata)
    # --kind on the command line
    by_flag = CliRunner().invoke(cli, ["eval", "--model", MODEL, "--dataset", "MyYesNo", "--kind", "yorn",
                                       "--engine", "hf", "--work-dir", str(tmp_path / "flag")])
    assert by_flag.exit_code == 0, by_flag.output
    assert "score:" in by_flag.output
    # VLMEvalKit's config `class`, one class per dataset, in one suite
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({"model": {MODEL: {}}, "data": {
        name: {"class": KINDS[kind], "dataset": name} for name, kind in kinds.items()}}))
    by_config = CliRunner().invoke(cli, ["eval", "--config", str(config), "--engine", "hf",
                                         "--work-dir", str(tmp_path / "config")])
    assert by_config.exit_code == 0, by_config.output
    rows = summary(tmp_path / "config")
    for name, kind in kinds.items():
        assert type(load_dataset(name, 2, kind)).__name__ == KINDS[kind]
        assert rows[name]["score"] is not None and rows[name]["failed"] == 0, rows[name]
        assert rows[name]["score"] == pytest.approx(rescored(tmp_path / "config", name), abs=1e-4)
    assert rows["MyYesNo"]["score"] == summary(tmp_path / "flag")["MyYesNo"]["score"]


def test_a_tsv_that_lacks_what_its_kind_needs_fails_in_one_line(lmudata):
    rows = sample_data.yn_rows(6, seed=8)
    rows[3]["answer"] = "maybe"
    write_dataset(lmudata, "BadYesNo", rows)
    open_rows = [{k: v for k, v in r.items() if k != "answer"} for r in sample_data.vqa_rows(6, seed=9)]
    write_dataset(lmudata, "NoAnswers", open_rows)
    single = sample_data.vqa_rows(6, seed=10)
    single[2]["answer"] = "red"
    write_dataset(lmudata, "OneAnswerEach", single)
    code = sample_data.vqa_rows(6, seed=11)
    code[4]["answer"] = "__import__('os').getpid()"
    write_dataset(lmudata, "AnswerIsCode", code)
    for name, kind, cause in (("BadYesNo", "yorn", "row 3 has answer 'maybe'"),
                              ("NoAnswers", "vqa", "has no `answer` column"),
                              ("OneAnswerEach", "vqa", "row 2 has answer 'red'; VLMEvalKit's VQA score counts"),
                              ("AnswerIsCode", "vqa", "row 4 has answer \"__import__('os').getpid()\"; "
                                                      "VLMEvalKit would run it")):
        result = CliRunner().invoke(cli, ["eval", "--model", MODEL, "--dataset", name, "--kind", kind])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and cause in lines[0], result.output


@pytest.mark.engine
def test_a_tsv_without_a_kind_that_vlmevalkit_cannot_score_says_how_then_scores(tmp_path, lmudata):
    write_dataset(lmudata, "KindLess", sample_data.yn_rows(8, seed=12))
    args = ["eval", "--model", MODEL, "--dataset", "KindLess", "--engine", "hf", "--work-dir", str(tmp_path)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 1 and "CustomVQADataset, which cannot score" in first.output, first.output
    predictions = tmp_path / MODEL / f"{MODEL}_KindLess.xlsx"
    assert "--kind yorn" in first.output and predictions.exists()
    kept = predictions.read_bytes()
    again = CliRunner().invoke(cli, args + ["--kind", "yorn", "--mode", "eval"])
    assert again.exit_code == 0 and "score:" in again.output, again.output
    assert predictions.read_bytes() == kept and "engine -" in again.output   # no engine: scored as kept
    report = json.loads((tmp_path / MODEL / f"{MODEL}_KindLess_run.json").read_text())
    assert report["items"] == 8 and report["generated"] == 0
