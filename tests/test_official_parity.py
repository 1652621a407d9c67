"""Parity on VLMEvalKit's official datasets: the same requests reach vLLM, the same predictions and the
same score tables as VLMEvalKit's own loop, on the embedded checkpoint.

Small synthetic TSVs are written in each official dataset's real format under its official name (so
its prompt rules and evaluator apply; `official.without_md5` lets VLMEvalKit load them offline, in this
test only). VLMEvalKit's side is its `infer_data_job` over its `Qwen2VLChat(use_vllm=True)` on its own
vLLM engine (`VLMEvalLoop`), then its dataset's `evaluate`; ours is `run_eval` on our engine. Requests
are compared where both paths enter vLLM's renderer (`LLM._preprocess_cmpl`, under `LLM.generate`,
VLMEvalKit's call, and `LLM.enqueue`, ours): the prompt text, each image's size and pixels, and what
vLLM made of them (token ids, image hashes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from vlm_batch_testing import official

NAMES = ["MMStar", "AI2D_TEST", "ScienceQA_VAL", "SEEDBench_IMG", "MMBench_DEV_EN", "MME", "POPE", "HallusionBench",
         "MMMU_DEV_VAL", "OCRBench", "TextVQA_VAL", "ChartQA_TEST", "MathVista_MINI"]
# VLMEvalKit's MathVista evaluator asserts a working OpenAI judge (after ~20 s of retries offline):
# requests and predictions are compared, scores on neither side.
NEEDS_API_JUDGE = {"MathVista_MINI"}
# Qwen2VLChat asks OCRBench's images at 78400 pixels at least (10*10 cells of 28 px), more than the
# embedded card's max_pixels (12544): qwen-vl-utils then refuses every image (on both sides; see
# test_ocrbench_beyond_the_cards_pixel_bounds). Its parity runs with bounds that hold that minimum.
PIXELS = {"OCRBench": {"max_pixels": 10 * 10 * 28 * 28}}


@dataclass(frozen=True)
class Seen:
    """One prompt as vLLM received it, and what its renderer made of it."""
    text: str
    images: tuple        # (width, height, mode, sha1 of the pixels) per image
    token_ids: tuple
    image_hashes: tuple  # vLLM's hash of each processed image

    @classmethod
    def of(cls, prompt, rendered) -> "Seen":
        images = (prompt.get("multi_modal_data") or {}).get("image") or []
        images = images if isinstance(images, list) else [images]
        return cls(text=prompt["prompt"],
                   images=tuple((im.width, im.height, im.mode, hashlib.sha1(im.tobytes()).hexdigest())
                                for im in images),
                   token_ids=tuple(rendered["prompt_token_ids"]),
                   image_hashes=tuple((rendered.get("mm_hashes") or {}).get("image", ())))


@dataclass
class Side:
    requests: list
    predictions: pd.DataFrame
    score: object       # the evaluator's table (or the exception that stopped the run)


@pytest.fixture(scope="module")
def official_sets():
    root = Path(os.environ["LMUData"])
    names = [official.write(root, name) for name in NAMES]
    with official.without_md5(names):
        yield names


@pytest.fixture(scope="module")
def boundary():
    """Every prompt either engine renders, in order."""
    from vllm.entrypoints.llm import LLM

    seen: list[Seen] = []
    original = LLM._preprocess_cmpl

    def recorded(self, prompts, *args, **kwargs):
        prompts = list(prompts)
        rendered = original(self, prompts, *args, **kwargs)
        seen.extend(Seen.of(p, r) for p, r in zip(prompts, rendered))
        return rendered

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LLM, "_preprocess_cmpl", recorded)
        yield seen


def _cold_images():
    """Each side decodes the images itself."""
    shutil.rmtree(Path(os.environ["LMUData"]) / "images", ignore_errors=True)


def _predictions(path) -> pd.DataFrame:
    from openpyxl.utils.escape import unescape

    data = pd.read_excel(path)
    data["prediction"] = [unescape(str(p)) for p in data["prediction"]]
    return data.sort_values("index", key=lambda s: s.astype(str)).reset_index(drop=True)


def _table(score):
    """A score table as comparable records, in a fixed order (VLMEvalKit lists splits from sets)."""
    if isinstance(score, dict):
        score = pd.DataFrame([score])

    def value(x):
        return repr(round(float(x), 9)) if isinstance(x, (float, int)) and not isinstance(x, bool) else repr(x)
    return sorted(tuple(sorted((str(k), value(v)) for k, v in row.items())) for row in score.to_dict("records"))


@pytest.fixture(scope="module")
def vlmevalkit(official_sets, boundary, tiny_card, tmp_path_factory):
    """VLMEvalKit's own run of every set: `infer_data_job` over its Qwen2VLChat on its own vLLM, then its
    evaluator. Its engine is closed before ours is used (one engine of ours at a time)."""
    import warnings

    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job
    from vlmeval.smp import get_pred_file_path
    from vlm_batch.vlmeval import quiet_import
    from vlm_batch.vlmeval.loop import VLMEvalLoop

    quiet_import()
    work = tmp_path_factory.mktemp("vlmevalkit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = {name: build_dataset(name) for name in official_sets}
    loop = VLMEvalLoop(tiny_card, datasets[official_sets[0]], {})
    # The card's answer length, as a VLMEvalKit config entry for this checkpoint would set it.
    loop.model.max_new_tokens = tiny_card.max_new_tokens
    card_pixels = {k: getattr(loop.model, k) for k in ("min_pixels", "max_pixels")}
    sides = {}
    try:
        try:   # OCRBench with the card's own pixel bounds: VLMEvalKit's run stops at the first image
            infer_data_job(loop.model, work_dir=str(tmp_path_factory.mktemp("bounds")), model_name=tiny_card.name,
                           dataset=build_dataset("OCRBench"))
            sides["OCRBench@card"] = Side([], None, None)
        except Exception as exc:
            sides["OCRBench@card"] = Side([], None, exc)
        for name, dataset in datasets.items():
            _cold_images()
            boundary.clear()
            loop.model.__dict__.update({**card_pixels, **PIXELS.get(name, {})})
            infer_data_job(loop.model, work_dir=str(work), model_name=tiny_card.name, dataset=dataset)
            requests = list(boundary)
            path = get_pred_file_path(str(work), tiny_card.name, name)
            score = None
            if name not in NEEDS_API_JUDGE:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    score = dataset.evaluate(path, model="exact_matching", nproc=4)
            sides[name] = Side(requests, _predictions(path), score)
    finally:
        loop.close()
    return sides


@pytest.mark.engine
@pytest.mark.parametrize("name", NAMES)
def test_official_set_matches_vlmevalkit(name, vlmevalkit, boundary, tiny_card, tmp_path, request):
    from dataclasses import replace

    from vlm_batch import runner

    theirs = vlmevalkit[name]
    engine = request.getfixturevalue("vllm_engine")   # after VLMEvalKit's engine has gone
    card = replace(tiny_card, options={**tiny_card.options, **PIXELS.get(name, {})})
    _cold_images()
    boundary.clear()
    summary = runner.run_eval(card, name, engine=engine, work_dir=str(tmp_path),
                              mode="infer" if name in NEEDS_API_JUDGE else "all")
    ours = list(boundary)

    assert not summary.failed, summary.failed
    assert len(ours) == summary.generated == len(theirs.requests) == len(theirs.predictions) > 0
    for i, (mine, other) in enumerate(zip(ours, theirs.requests)):
        assert mine == other, (name, i)
    pd.testing.assert_frame_equal(_predictions(summary.prediction_file), theirs.predictions)
    if name not in NEEDS_API_JUDGE:
        assert summary.score is not None, summary.eval_error
        assert _table(summary.score) == _table(theirs.score)

    if name == "HallusionBench":   # its questions without an image are dropped on both sides
        rows = pd.read_csv(Path(os.environ["LMUData"]) / f"{name}.tsv", sep="\t")
        with_image = rows[rows["image"].notna()]
        assert 0 < len(with_image) < len(rows)
        assert sorted(theirs.predictions["index"]) == sorted(with_image["index"])
    if name == "MMMU_DEV_VAL":     # five images in one question: all five reach vLLM on both sides
        assert max(len(seen.images) for seen in ours) == 5


@pytest.mark.engine
def test_ocrbench_beyond_the_cards_pixel_bounds(vlmevalkit, tiny_card, tmp_path, request):
    """OCRBench's minimum above the card's maximum: VLMEvalKit's run stops on qwen-vl-utils' assertion;
    ours fails each item with that cause (a bad item fails alone)."""
    from vlm_batch import runner

    cause = "max_pixels of image must be greater than or equal to min_pixels"
    theirs = vlmevalkit["OCRBench@card"].score
    assert isinstance(theirs, AssertionError) and cause in str(theirs)
    summary = runner.run_eval(tiny_card, "OCRBench", engine=request.getfixturevalue("vllm_engine"),
                              work_dir=str(tmp_path))
    rows = len(pd.read_csv(Path(os.environ["LMUData"]) / "OCRBench.tsv", sep="\t"))
    assert summary.generated == 0 and len(summary.failed) == rows
    assert all(cause in error for error in summary.failed.values()), summary.failed


def test_official_name_offline_without_its_file(lmudata, monkeypatch):
    """The product keeps VLMEvalKit's check: an official name whose local TSV is not the official file
    (its MD5 differs) is downloaded again; offline that fails, in one clear line."""
    import random

    import vlmeval.dataset.image_base as image_base

    from vlm_batch.demo import sample_data
    from vlm_batch.vlmeval import DatasetError
    from vlm_batch.vlmeval.datasets import load_dataset

    asked = []

    def offline(url, path):   # as here, with no network; where there is one, no real download
        asked.append(url)
        raise OSError("Name or service not known")

    monkeypatch.setattr(image_base, "download_file", offline)
    name = "MMBench_DEV_CN"   # official (it has an MD5), and not one the parity test writes
    sample_data.write_tsv(lmudata / f"{name}.tsv", official.mmbench_circular(4, random.Random(1)))
    with pytest.raises(DatasetError, match=f"Could not load dataset '{name}'.*Name or service not known"):
        load_dataset(name)
    assert asked and asked[0].endswith(f"{name}.tsv")
