"""What the model-family tests share: VLMEvalKit's own loop as the prompt oracle, requests, engine checks.

The oracle runs VLMEvalKit's `infer_data_job` over the family's real VLMEvalKit model object (built by
its real constructor with only the weight loading stubbed by the test); its `generate` records each
message. Our side is `vlm_batch.prompt_builder`, which never runs that constructor.
"""

from __future__ import annotations

import pandas as pd
from click.testing import CliRunner
from openpyxl.utils.escape import unescape

from helpers import mmbench_rows, write_dataset
from vlm_batch import runner
from vlm_batch.prepare import decode_images, prepare
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

# An official MMBench-style MCQ name VLMEvalKit loads from $LMUData without an MD5 check.
MMB = "MMBench_V11_MINI"


class Stub:
    """Stands in for weights: `.eval()`, `.to()` and `.cuda()` return itself; it is never called."""

    device = "cpu"

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def cuda(self, *args, **kwargs):
        return self


def stub_loader(*args, **kwargs):
    return Stub()


def recording(model):
    """The VLMEvalKit model, its `generate` replaced by a recorder that answers "A"."""
    model.recorded = []

    def record(message, dataset=None):
        model.recorded.append(message)
        return "A"

    model.generate = record
    return model


def vlmeval_messages(model, name: str, work_dir, model_name: str) -> list:
    """The messages VLMEvalKit's own inference loop gives `model` for dataset `name`."""
    from vlmeval.inference import infer_data_job

    infer_data_job(model, work_dir=str(work_dir), model_name=model_name,
                   dataset=load_dataset(name))
    return list(model.recorded)


def our_messages(card, name: str) -> list:
    dataset = load_dataset(name)
    build = prompt_builder(card, dataset)
    return [build(dataset.data.iloc[i]) for i in range(len(dataset.data))]


def assert_prompt_parity(card, vlmeval_model, lmudata, tmp_path, n: int = 12, name: str = MMB) -> list:
    """Our messages for MMBench-style rows equal VLMEvalKit's loop's, item for item; returns them."""
    write_dataset(lmudata, name, mmbench_rows(n))
    expected = vlmeval_messages(vlmeval_model, name, tmp_path, card.prompt_name)
    ours = our_messages(card, name)
    assert len(expected) == len(ours) == n
    assert ours == expected
    return ours


# Local TSVs of the other kinds, made datasets of VLMEvalKit's class for the kind (as --kind does).
KIND_SETS = {"yorn": ("ParityYesNo", "yn_rows"), "vqa": ("ParityOpen", "vqa_rows"),
             "multi": ("ParityMultiImage", "multi_rows")}


def kind_dataset(lmudata, kind: str, n: int = 8) -> str:
    """A Y/N, open-answer or multi-image dataset of `n` sample rows, registered as its kind's class."""
    from vlm_batch.demo import sample_data

    name, make = KIND_SETS[kind]
    write_dataset(lmudata, name, getattr(sample_data, make)(n, seed=40 + n))
    load_dataset(name, kind="mcq" if kind == "multi" else kind)
    return name


def assert_kind_parity(card, vlmeval_model, lmudata, tmp_path, kind: str, n: int = 8) -> list:
    """Our messages for Y/N, open-answer or multi-image rows equal VLMEvalKit's loop's; returns them."""
    name = kind_dataset(lmudata, kind, n)
    expected = vlmeval_messages(vlmeval_model, name, tmp_path, card.prompt_name)
    ours = our_messages(card, name)
    assert len(expected) == len(ours) == n
    assert ours == expected
    if kind == "multi":
        assert all(sum(p["type"] == "image" for p in m) in (2, 3) for m in ours)
    return ours


def _looks(image):
    import numpy as np

    return np.asarray(image.convert("RGB").resize((16, 16))).astype(float)


def assert_multi_image_requests(card, lmudata, limit: int, n: int = 8) -> None:
    """Multi-image rows reach the request with their first `limit` images, in the row's order."""
    from vlm_batch.images import open_rgb

    name = kind_dataset(lmudata, "multi", n)
    dataset = load_dataset(name)
    build = prompt_builder(card, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare_request(card, message, name)
        given = [open_rgb(p["value"]) for p in message if p["type"] == "image"]
        assert len(request.images) == min(limit, len(given)), (row["index"], len(request.images))
        for got, want in zip(request.images, given):   # each image is the one in its place, not another
            distances = [abs(_looks(got) - _looks(other)).mean() for other in given]
            assert min(distances) == distances[given.index(want)] < 12, (row["index"], distances)


def requests_for(card, name: str, n: int | None = None) -> list:
    """Engine requests for the first `n` rows of dataset `name`, as the runner prepares them."""
    dataset = load_dataset(name, n)
    build = prompt_builder(card, dataset)
    return [prepare(card, row["index"], build(row), dataset.dataset_name)
            for _, row in dataset.data.iterrows()]


def assert_batched_equals_alone(engine, requests, min_distinct: int = 3) -> dict:
    """All requests together give what each gives alone; the answers vary (equality is not trivial)."""
    together = {r.index: r for r in engine.generate(requests)}
    alone = {r.index: next(iter(engine.generate([r]))) for r in requests}
    assert set(together) == set(alone) == {r.index for r in requests}
    assert all(r.ok for r in together.values()), [r.error for r in together.values() if not r.ok][:3]
    diff = {i: (together[i].text, alone[i].text) for i in together if together[i].text != alone[i].text}
    assert not diff, diff
    assert len({r.text for r in together.values()}) >= min_distinct
    return {i: r.text for i, r in together.items()}


def cli_eval(model: str, dataset: str, work_dir, engine: str, limit: int, *extra: str):
    """`vlm-batch eval` in this process; returns (click result, predictions by index)."""
    from vlm_batch.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--model", model, "--dataset", dataset, "--engine", engine,
                                      "--limit", str(limit), "--work-dir", str(work_dir), *extra])
    predictions = {}
    path = work_dir / model / f"{model}_{dataset}.xlsx"
    if path.exists():
        data = pd.read_excel(path)
        predictions = {i: unescape(str(p)) for i, p in zip(data["index"], data["prediction"])}
    return result, predictions


def assert_eval_through_engine(card, engine, work_dir, name: str, n: int) -> None:
    """`run_eval` (what `vlm-batch eval` runs) on a running engine: files, scores, same answers."""
    summary = runner.run_eval(card, name, work_dir=str(work_dir), engine=engine, limit=n)
    assert summary.generated == n and not summary.failed, summary.failed
    data = pd.read_excel(summary.prediction_file)
    direct = {r.index: r.text for r in engine.generate(requests_for(card, name, n))}
    assert {i: unescape(str(p)) for i, p in zip(data["index"], data["prediction"])} == direct
    assert summary.score is not None


def prepare_request(card, message, dataset: str):
    """The plugin's request for one message (images decoded as the runner does), without the memory
    estimate the runner adds: that reads the checkpoint's config, which is not here for hub models."""
    from vlm_batch.plugins import hooks

    request = hooks(card).prepare(decode_images(message), dataset)
    request.dataset = dataset
    return request


class RecordingLLM:
    """Stands in for VLMEvalKit's `vllm.LLM`: records what its vLLM path asks for, answers "A"."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params=None, **kwargs):
        from types import SimpleNamespace

        self.calls.append((prompts[0] if isinstance(prompts, list) else prompts, sampling_params))
        return [SimpleNamespace(outputs=[SimpleNamespace(text="A")])]


def vlmeval_vllm_input(model, message, dataset: str) -> tuple[dict, object]:
    """(the request, its SamplingParams) a VLMEvalKit class's own vLLM path gives `vllm.LLM` for a message."""
    model.llm = llm = RecordingLLM()
    model.generate_inner_vllm(message, dataset=dataset)
    return llm.calls[-1]
