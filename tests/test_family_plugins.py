"""All five model families: listed with their engines, each removable, none named by the core."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from click.testing import CliRunner

from vlm_batch.cli import cli

FAMILIES = {   # entry point -> (names it serves, engines shown by `vlm-batch models`)
    "qwen2_vl": (["Qwen2-VL-2B-Instruct", "Qwen2-VL-7B-Instruct", "Qwen2-VL-72B-Instruct"], "vllm, hf"),
    "molmo": (["molmoE-1B-0924", "molmo-7B-D-0924", "molmo-7B-O-0924", "molmo-72B-0924", "tiny-molmo"], "vllm, hf"),
    "llama4": (["Llama-4-Scout-17B-16E-Instruct", "tiny-llama4"], "vllm, hf"),
    "gemma3": (["Gemma3-4B", "Gemma3-12B", "Gemma3-27B", "tiny-gemma3"], "vllm, hf"),
    "minicpm_v": (["MiniCPM-V-4_6", "tiny-minicpm-v"], "vllm, hf"),
    "qwen3_vl": (["Qwen3-VL-8B-Instruct", "Qwen3-VL-30B-A3B-Thinking", "Qwen3.5-27B", "tiny-qwen3-vl"], "vllm, hf"),
}


def listing(output: str) -> dict:
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_models_lists_every_family_with_its_engines():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = listing(result.output)
    for plugin, (names, engines) in FAMILIES.items():
        for name in names:
            assert f"  {plugin}  engines: {engines}" in lines[name], lines[name]
    assert "  omnilmm  engines: hf" in lines["OmniLMM_12B"] and "vllm" not in lines["OmniLMM_12B"]


DISTRIBUTIONS = {"minicpm_v": "vlm-batch-omnilmm"}   # MiniCPM-V ships beside OmniLMM, its predecessor


def test_each_family_is_an_installed_plugin_of_its_distribution():
    installed = {ep.name: ep for ep in entry_points(group="vlm_batch")}
    for plugin in FAMILIES:
        assert plugin in installed
        want = DISTRIBUTIONS.get(plugin, f"vlm-batch-{plugin.replace('_', '-')}")
        assert installed[plugin].dist.metadata["Name"] == want


def test_without_a_plugin_its_models_are_gone():
    """A process whose environment lacks the gemma3 distribution's entry point serves no Gemma3 name."""
    others = sorted(ep.name for ep in entry_points(group="vlm_batch") if ep.name != "gemma3")
    env = dict(os.environ, VLM_BATCH_PLUGINS=",".join(others))
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "models"], capture_output=True, text=True,
                         env=env, check=True).stdout
    lines = listing(out)
    assert not any(name.startswith(("Gemma3", "tiny-gemma3")) for name in lines)
    assert "molmo-7B-D-0924" in lines and "OmniLMM_12B" in lines and "Llama-4-Scout-17B-16E-Instruct" in lines


def test_unregistered_family_is_gone_in_process():
    from vlm_batch.plugins import load_plugins, pm

    load_plugins()
    plugin = pm.unregister(name="llama4")
    try:
        lines = listing(CliRunner().invoke(cli, ["models"]).output)
        assert "Llama-4-Scout-17B-16E-Instruct" not in lines and "Gemma3-4B" in lines
    finally:
        pm.register(plugin, name="llama4")
    assert "Llama-4-Scout-17B-16E-Instruct" in listing(CliRunner().invoke(cli, ["models"]).output)


def test_core_names_no_model_family():
    core = Path(__file__).resolve().parents[1] / "src" / "vlm_batch"
    pattern = re.compile(r"molmo|llama|gemma|omnilmm|minicpm|qwen", re.I)
    hits = [f"{path.name}:{n}" for path in core.rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_every_family_prepares_a_text_only_request(tmp_path):
    """A message without an image (a row the dataset's VLMEvalKit class keeps as a text-only question)
    becomes a request with no image, its prompt the image prompt without the image's slot."""
    from difflib import SequenceMatcher

    from PIL import Image

    from vlm_batch.plugins import get_models, hooks
    from vlm_batch.prepare import decode_images

    picture = tmp_path / "red.png"
    Image.new("RGB", (112, 112), (200, 10, 10)).save(picture)
    question = {"type": "text", "value": "Is the sky blue? Please answer yes or no."}
    cards = {}
    for card in get_models().values():   # one card a family, its tiny one where there is one
        if card.plugin in FAMILIES or card.plugin == "omnilmm":
            if card.plugin not in cards or card.name.startswith("tiny-"):
                cards[card.plugin] = card
    assert set(cards) == {*FAMILIES, "omnilmm"}
    for plugin, card in cards.items():
        family = hooks(card)
        text = family.prepare(decode_images([question]), "HiPhO")
        with_image = family.prepare(decode_images([{"type": "image", "value": str(picture)}, question]), "HiPhO")
        assert text.images == [] and len(with_image.images) == 1, plugin
        assert question["value"] in text.prompt, plugin
        steps = SequenceMatcher(None, text.prompt, with_image.prompt, autojunk=False).get_opcodes()
        assert all(tag in ("equal", "insert") for tag, *_ in steps), (plugin, text.prompt, with_image.prompt)
