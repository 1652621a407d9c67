"""Plugins: one registered in-process shows up in `vlm-batch models` and can serve an eval."""

import pandas as pd
import pytest
from click.testing import CliRunner

from vlm_batch import ModelCard, Request, hookimpl, runner
from vlm_batch.cli import cli
from vlm_batch.plugins import get_model, pm


class EchoPlugin:
    """A third-party plugin: its own name and prompt format, on the tiny Qwen2-VL weights."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.prepared = []

    @hookimpl
    def vlm_batch_models(self):
        return [ModelCard(name="my-echo-model", family="echo", checkpoint=self.checkpoint,
                          engines=("vllm",), max_new_tokens=4)]

    @hookimpl
    def vlm_batch_prepare(self, card, message, dataset):
        if card.family != "echo":
            return None
        images = [p["image"] for p in message if p["type"] == "image"]
        text = " ".join(p["value"] for p in message if p["type"] == "text")
        self.prepared.append(text)
        placeholders = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        return Request(prompt=f"{placeholders}Q: {text}\nA:", images=images, max_new_tokens=card.max_new_tokens)


@pytest.fixture
def echo(tiny_card):
    plugin = EchoPlugin(tiny_card.path())
    pm.register(plugin, name="echo-test-plugin")
    yield plugin
    pm.unregister(name="echo-test-plugin")


def test_in_process_plugin_is_listed(echo):
    result = CliRunner().invoke(cli, ["models"])
    line = next(line for line in result.output.splitlines() if line.startswith("my-echo-model"))
    assert "echo-test-plugin" in line and "engines: vllm" in line
    plugins = CliRunner().invoke(cli, ["plugins"]).output
    assert "echo-test-plugin (in-process): vlm_batch_models, vlm_batch_prepare" in plugins


def test_unregistered_plugin_is_gone(echo):
    pm.unregister(name="echo-test-plugin")
    try:
        assert "my-echo-model" not in CliRunner().invoke(cli, ["models"]).output
    finally:
        pm.register(echo, name="echo-test-plugin")


@pytest.mark.engine
def test_in_process_plugin_serves_an_eval(echo, vllm_engine, tmp_path):
    card = get_model("my-echo-model")
    summary = runner.run_eval(card, "VLMBatchShapes", work_dir=str(tmp_path), engine=vllm_engine, limit=6)
    assert len(echo.prepared) == 6 and summary.generated == 6
    data = pd.read_excel(tmp_path / "my-echo-model" / "my-echo-model_VLMBatchShapes.xlsx", keep_default_na=False)
    # The embedded model may answer this foreign prompt with nothing; what matters is that every item
    # went through the plugin's prepare and the engine, and none failed.
    assert len(data) == 6 and not summary.failed
    assert not any(str(p).startswith("Failed to obtain answer") for p in data["prediction"])


def test_hf_only_model_refuses_vllm_before_loading(echo):
    from vlm_batch.engines import EngineError
    from vlm_batch.engines.choice import decide

    card = get_model("my-echo-model")
    with pytest.raises(EngineError, match="has no hf engine; it runs on: vllm"):
        decide(card, "hf")
