"""Test setup: everything offline and under a temp dir; one vLLM engine for the whole session."""

import os
import tempfile

import pytest
from vlm_batch.vlmeval.datasets import load_dataset

_ROOT = tempfile.mkdtemp(prefix="vlm-batch-tests-")
# Before anything imports VLMEvalKit or transformers: data, caches and the hub all local.
os.environ["LMUData"] = os.path.join(_ROOT, "LMUData")
os.makedirs(os.environ["LMUData"], exist_ok=True)
os.environ.setdefault("VLM_BATCH_HOME", os.path.join(_ROOT, "home"))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(_ROOT, "hf"))


@pytest.fixture(scope="session")
def tiny_card():
    from vlm_batch.plugins import get_model

    return get_model("tiny-qwen2-vl")


@pytest.fixture(scope="session")
def vllm_engine(tiny_card):
    """The session's one vLLM engine (each start costs 13-45 s on this CPU)."""
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_card)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def shapes():

    return load_dataset("VLMBatchShapes")


@pytest.fixture
def lmudata():
    from pathlib import Path

    return Path(os.environ["LMUData"])


@pytest.fixture
def vlmeval_qwen(monkeypatch, tiny_card):
    """VLMEvalKit's real Qwen2VLChat on the tiny checkpoint (weights stubbed: only prompts matter);
    its `generate` records each message it is given and answers "A"."""
    import transformers
    import vlmeval.vlm.qwen2_vl.model as qwen_model

    monkeypatch.setattr(qwen_model, "get_gpu_memory", lambda: [80_000])
    monkeypatch.setattr(transformers.Qwen2VLForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: type("Stub", (), {"eval": lambda self: None})()))
    model = qwen_model.Qwen2VLChat(model_path=tiny_card.path(), **tiny_card.options)
    model.recorded = {}

    def record(message, dataset=None):
        model.recorded[len(model.recorded)] = (message, dataset)
        return "A"

    model.generate = record
    return model


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """Every `helpers.Run` subprocess a test started, with its children, is gone after it."""
    yield
    import sys

    import psutil

    helpers = sys.modules.get("helpers")
    for proc in (helpers.Run.started if helpers else []):
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    if helpers:
        helpers.Run.started.clear()
