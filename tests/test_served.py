"""VLMEvalKit's registry as cards: the shipped snapshot, every name of a served class (or its reason),
the listing by family, names checked fast, and users' own checkpoints (a config's `class` entry,
`--model PATH`) with bad input in one line."""

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from vlm_batch.cli import cli
from vlm_batch.models import ModelCard, Unserved
from vlm_batch.plugins import get_models, get_unserved
from vlm_batch.vlmeval import registry

HEAVY = ("torch", "vllm", "vlmeval", "transformers")
SERVED = ("Qwen2VLChat", "Qwen3VLChat")


def test_shipped_snapshot_is_the_installed_registry():
    """The snapshot equals what the live `supported_VLM` gives now (class, arguments, api or not)."""
    shipped = json.loads(registry.SHIPPED.read_text())
    assert shipped["version"] == registry.installed_version()
    assert shipped["entries"] == registry.extract()["entries"]
    assert len(shipped["entries"]) > 500


def test_another_version_is_extracted_once_and_cached(monkeypatch):
    calls = []

    def extract():
        calls.append(1)
        return {"version": "9.9.9", "entries": {"Some-Model": {"class": "SomeChat", "kwargs": {"model_path": "x/y"},
                                                               "api": False}}}

    monkeypatch.setattr(registry, "installed_version", lambda: "9.9.9")
    monkeypatch.setattr(registry, "extract", extract)
    registry.snapshot.cache_clear()
    try:
        assert list(registry.entries()) == ["Some-Model"]
        registry.snapshot.cache_clear()
        assert registry.entries()["Some-Model"].cls == "SomeChat"
        assert calls == [1]   # the second read came from the cache file
    finally:
        registry.snapshot.cache_clear()


def test_every_name_of_a_served_class_is_a_card_or_has_a_reason():
    cards, unserved = get_models(), {u.name: u for u in get_unserved()}
    entries = registry.entries(SERVED)
    assert len(entries) == 54
    for name, entry in entries.items():
        assert (name in cards) != (name in unserved), name
        if name in cards:
            card = cards[name]
            assert card.checkpoint == entry.model_path and card.vlmeval_class == entry.cls
            assert dict(card.options) == entry.args   # the class's arguments, applied by its plugin
    assert sorted(unserved) == ["Qwen2.5-Omni-7B", "Qwen2.5-Omni-7B-ForVideo", "Qwen3-Omni-30B-A3B-Captioner",
                                "Qwen3-Omni-30B-A3B-Instruct", "Qwen3-Omni-30B-A3B-Thinking"]
    assert all("Omni" in u.reason or "audio" in u.reason for u in unserved.values())


def test_models_groups_by_family_with_counts_and_all_adds_the_reasons():
    out = CliRunner().invoke(cli, ["models"]).output
    heads = {line.split(":")[0]: line for line in out.splitlines() if " models (plugin " in line}
    assert "32 of the 34 names of VLMEvalKit's Qwen2VLChat" in heads["qwen2-vl"]
    assert "17 of the 20 names of VLMEvalKit's Qwen3VLChat" in heads["qwen3-vl"]
    assert "Qwen2.5-Omni-7B" not in out
    lines = {line.split()[0]: line for line in CliRunner().invoke(cli, ["models", "--all"]).output.splitlines()}
    assert "not served: a Qwen2.5-Omni" in lines["Qwen2.5-Omni-7B"]
    assert "not served: an audio captioner" in lines["Qwen3-Omni-30B-A3B-Captioner"]
    assert "engines: vllm " in lines["Qwen2-VL-7B-Instruct-GPTQ-Int8"] + " "


def test_an_unknown_name_is_one_line_without_loading_any_heavy_library():
    code = ("import sys, time; t = time.time(); from vlm_batch.cli import cli\n"
            "try:\n    cli(['eval', '--model', 'Qwen2.5-VL-7B', '--dataset', 'MMBench_DEV_EN'])\n"
            "except SystemExit as e:\n    print('EXIT', e.code)\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "EXIT 2" in out.stdout and "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Unknown model 'Qwen2.5-VL-7B'" in errors[0]
    assert "Did you mean" in errors[0] and "Qwen2.5-VL-7B-Instruct" in errors[0]


def test_a_quantized_build_that_needs_a_gpu_says_so_before_loading(monkeypatch):
    from vlm_batch.engines import EngineError
    from vlm_batch.engines import environment
    from vlm_batch.engines.choice import decide

    monkeypatch.setattr(environment, "gpus_visible", lambda: False)
    card = get_models()["Qwen2-VL-7B-Instruct-GPTQ-Int8"]
    with pytest.raises(EngineError, match="needs a GPU: 8-bit GPTQ weights: vLLM-CPU's quantized kernel"):
        decide(card, "auto")
    assert get_models()["Qwen2.5-VL-7B-Instruct-AWQ"].engines == ("vllm",)


# Users' own checkpoints.

@pytest.fixture(scope="module")
def qwen25_folder():
    from vlm_batch.plugins import get_model

    return get_model("tiny-qwen2.5-vl").path()


def _plan(*args):
    from vlm_batch.plan import from_config, from_names

    return from_config(*args, engine="auto") if len(args) == 1 else from_names(*args, engine="auto")


def test_a_config_entry_with_class_and_model_path_runs_through_its_plugin(tmp_path, qwen25_folder):
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({
        "model": {"my-ft": {"class": "Qwen2VLChat", "model_path": qwen25_folder, "min_pixels": 3136,
                            "max_pixels": 12544, "max_new_tokens": 5, "system_prompt": "Be brief.",
                            "batch_size": 3}},
        "data": {"VLMBatchShapes": {}}}))
    (spec,) = _plan(str(config)).models
    card = spec.card
    assert (card.name, card.plugin, card.vlmeval_class, card.checkpoint) == ("my-ft", "qwen2_vl", "Qwen2VLChat",
                                                                             qwen25_folder)
    assert card.max_new_tokens == 5 and spec.options == {"batch_size": 3}
    assert card.options == {"min_pixels": 3136, "max_pixels": 12544, "max_new_tokens": 5, "system_prompt": "Be brief."}
    assert card.prompt_attrs == {"_use_custom_prompt": True}    # Qwen2VLChat's default


def test_a_checkpoint_folder_as_the_model_picks_the_family_by_architecture(qwen25_folder, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="vlm_batch"):
        (spec,) = _plan([qwen25_folder], ["VLMBatchShapes"]).models
    assert spec.card.plugin == "qwen2_vl" and spec.card.vlmeval_class == "Qwen2VLChat"
    assert spec.card.name == "tiny-qwen2.5-vl-v1" and spec.card.checkpoint == qwen25_folder
    said = [r.getMessage() for r in caplog.records if "VLMEvalKit's Qwen2VLChat prompts" in r.getMessage()]
    assert said == [f"{qwen25_folder}: a Qwen2_5_VLForConditionalGeneration checkpoint, served by the plugin "
                    "'qwen2_vl' with VLMEvalKit's Qwen2VLChat prompts"]


def test_bad_models_are_one_line_naming_what_is_served(tmp_path):
    from vlm_batch.plan import PlanError

    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    started = time.monotonic()
    with pytest.raises(PlanError) as bad:
        _plan([str(tmp_path / "empty"), str(other), str(tmp_path / "missing"), "no-org/no-model"], ["VLMBatchShapes"])
    message = str(bad.value)
    assert "\n" not in message and time.monotonic() - started < 30
    assert f"model '{tmp_path / 'empty'}': the folder is not a checkpoint (it has no config.json)" in message
    assert (f"model '{other}': its architecture LlavaForConditionalGeneration is served by no installed plugin; "
            "served: ") in message and "Qwen2_5_VLForConditionalGeneration (qwen2_vl)" in message
    assert f"model '{tmp_path / 'missing'}': no such checkpoint folder" in message
    assert "model 'no-org/no-model': not a model name, and its config.json could not be read" in message
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({"model": {"a": {"class": "NoSuchChat", "model_path": "/x"},
                                            "b": {"class": "Qwen2VLChat"}},
                                  "data": {"VLMBatchShapes": {}}}))
    with pytest.raises(PlanError) as bad:
        _plan(str(config))
    assert "model 'a': no installed plugin serves VLMEvalKit's class 'NoSuchChat'; served: Qwen2VLChat (qwen2_vl), " \
           "Qwen3VLChat (qwen3_vl)" in str(bad.value)
    assert "model 'b': a 'Qwen2VLChat' entry needs its checkpoint as 'model_path'" in str(bad.value)


def test_a_class_that_cannot_load_the_checkpoint_says_so(tmp_path):
    from vlm_batch.served import ServeError, class_card

    folder = tmp_path / "q3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3VLForConditionalGeneration"]}))
    with pytest.raises(ServeError, match="Qwen3VLForConditionalGeneration, which Qwen2VLChat cannot load"):
        class_card("x", "Qwen2VLChat", {"model_path": str(folder)})
    assert isinstance(class_card("x", "Qwen3VLChat", {"model_path": str(folder)}), ModelCard)


def test_a_plugin_card_hook_answers_for_its_own_classes_only():
    """Each registry card is its class's plugin's; the core never asks another plugin."""
    cards = get_models()
    assert {cards[n].plugin for n in registry.entries(["Qwen2VLChat"]) if n in cards} == {"qwen2_vl"}
    assert {cards[n].plugin for n in registry.entries(["Qwen3VLChat"]) if n in cards} == {"qwen3_vl"}
    assert all(isinstance(u, Unserved) and u.family for u in get_unserved())


def test_split_think_splits_as_vlmevalkit_does(tmp_path, lmudata, monkeypatch):
    """With SPLIT_THINK set, the prediction file is what VLMEvalKit's own `infer_data_job` writes for the
    same answers (reasoning split off into `thinking`); without it, the whole answer stays."""
    import pandas as pd
    from vlmeval.inference import infer_data_job

    from helpers import mmbench_rows, write_dataset
    from vlm_batch.vlmeval.datasets import load_dataset
    from vlm_batch.vlmeval.files import write_predictions

    answers = ["I see a circle.</think>\n\nA", "<think>\nhmm</think> B", "C", "x</think>y</think>\n D"]

    class Thinker:
        INTERLEAVE, VIDEO_LLM, is_api = False, False, False

        def __init__(self):
            self.n = 0

        def set_dump_image(self, f):
            self.dump_image = f

        def use_custom_prompt(self, name):
            return False

        def generate(self, message, dataset=None):
            self.n += 1
            return answers[(self.n - 1) % len(answers)]

    write_dataset(lmudata, "ThinkSet", mmbench_rows(8))
    monkeypatch.setenv("SPLIT_THINK", "1")
    (tmp_path / "theirs").mkdir()
    infer_data_job(Thinker(), work_dir=str(tmp_path / "theirs"), model_name="m", dataset=load_dataset("ThinkSet"))
    theirs = pd.read_excel(tmp_path / "theirs" / "m_ThinkSet.xlsx")
    dataset = load_dataset("ThinkSet")
    ours_file = tmp_path / "ours.xlsx"
    write_predictions(dataset, {i: answers[n % 4] for n, i in enumerate(dataset.data["index"])}, str(ours_file))
    ours = pd.read_excel(ours_file)
    assert ours["prediction"].tolist() == theirs["prediction"].tolist() == ["A", "B", "C", "D"] * 2
    assert ours["thinking"].fillna("").tolist() == theirs["thinking"].fillna("").tolist()
    monkeypatch.delenv("SPLIT_THINK")
    write_predictions(dataset, {i: answers[n % 4] for n, i in enumerate(dataset.data["index"])}, str(ours_file))
    assert pd.read_excel(ours_file)["prediction"].tolist()[:2] == answers[:2] and "thinking" not in pd.read_excel(ours_file)


def test_a_plugin_serving_only_vlmevalkit_names_is_not_asked_for_other_cards():
    """qwen3_vl lists no cards of its own (all come from the registry): it must still count as a family
    plugin, whose prepare answers for its cards only, not as a helper called for every model."""
    from vlm_batch.plugins import hooks, pm

    for name, owner in (("tiny-qwen2-vl", "qwen2_vl"), ("Qwen2.5-VL-7B-Instruct", "qwen2_vl"),
                        ("Qwen3-VL-8B-Instruct", "qwen3_vl"), ("tiny-gemma3", "gemma3")):
        asked = {pm.get_name(i.plugin) for i in hooks(get_models()[name])._prepare.get_hookimpls()}
        assert owner in asked and not {"qwen2_vl", "qwen3_vl", "gemma3"} - {owner} & asked, (name, asked)
