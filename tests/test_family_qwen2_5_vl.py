"""Qwen2.5-VL, served by the Qwen2-VL plugin: the cards of every Qwen2VLChat entry, VLMEvalKit's prompts
for every kind, the request VLMEvalKit's own vLLM path would give vLLM, and a tiny Qwen2.5-VL on vLLM
and transformers (greedy answers equal on both)."""

import dataclasses
import inspect

import pytest

from family_helpers import (MMB, assert_batched_equals_alone, assert_eval_through_engine, assert_kind_parity,
                            assert_multi_image_requests, assert_prompt_parity, cli_eval, kind_dataset, recording,
                            requests_for, stub_loader, vlmeval_vllm_input)
from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model, get_models
from vlm_batch.prepare import prepare
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder
from vlm_batch.vlmeval.registry import entries

NAME = "VLMBatchQwen25"   # a local MMBench-style set (the dataset's prompt, as Qwen2.5-VL's entries ask)


@pytest.fixture(scope="module")
def card():
    return get_model("tiny-qwen2.5-vl")


def vlmeval_model(monkeypatch, card, entry="Qwen2.5-VL-3B-Instruct", **changes):
    """VLMEvalKit's real Qwen2VLChat built as `entry` of its config, on the tiny checkpoint and its pixel
    bounds; weights stubbed, generate recorded."""
    import transformers
    import vlmeval.vlm.qwen2_vl.model as qwen_model

    monkeypatch.setattr(qwen_model, "get_gpu_memory", lambda: [80_000])
    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", stub_loader)
    args = {**entries()[entry].args, **card.options, **changes}
    return recording(qwen_model.Qwen2VLChat(model_path=card.path(), **args))


@pytest.fixture
def vlmeval_qwen25(monkeypatch, card):
    return vlmeval_model(monkeypatch, card)


def test_cards_apply_qwen2vlchat_arguments_as_it_does():
    """Each entry's card: its prompt switch and answer length as the constructor sets them, greedy as
    its vLLM path is, its pixels and system prompt kept for prepare; quantized builds on vLLM only."""
    from vlmeval.vlm import Qwen2VLChat

    defaults = {k: p.default for k, p in inspect.signature(Qwen2VLChat.__init__).parameters.items()}
    cards = get_models()
    for name, entry in entries(["Qwen2VLChat"]).items():
        if name not in cards:
            continue
        card, args = cards[name], entry.args
        assert card.prompt_attrs == {"_use_custom_prompt": args.get("use_custom_prompt", defaults["use_custom_prompt"])}
        assert card.max_new_tokens == args.get("max_new_tokens", defaults["max_new_tokens"])
        assert card.generation == {} and card.vllm_args["limit_mm_per_prompt"] == {"image": 24}
        assert card.engines == (("vllm",) if any(q in name for q in ("AWQ", "GPTQ")) else ("vllm", "hf")), name
    assert cards["QVQ-72B-Preview"].max_new_tokens == 8192 and cards["QVQ-72B-Preview"].vllm_args["tensor_parallel_size"] == 4
    assert cards["Qwen2.5-VL-7B-Instruct"].prompt_attrs == {"_use_custom_prompt": False}
    assert cards["Qwen2-VL-7B-Instruct"].prompt_attrs == {"_use_custom_prompt": True}


def test_messages_equal_vlmevalkit_loop(card, vlmeval_qwen25, lmudata, tmp_path):
    ours = assert_prompt_parity(card, vlmeval_qwen25, lmudata, tmp_path)
    # Qwen2.5-VL's entries turn the custom prompt off: MMBench's own prompt, image first.
    assert all(m[0]["type"] == "image" and "Please select the correct answer" in m[-1]["value"] for m in ours)


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_qwen25, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_qwen25, lmudata, tmp_path, kind)


def _assert_requests_equal_vlmevalkit_vllm(card, model, name):
    dataset = load_dataset(name)
    build = prompt_builder(card, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare(card, row["index"], message, name)
        theirs, params = vlmeval_vllm_input(model, message, name)
        assert request.prompt == theirs["prompt"]
        images = theirs["multi_modal_data"]["image"]
        assert [im.size for im in request.images] == [im.size for im in images]
        assert [im.tobytes() for im in request.images] == [im.tobytes() for im in images]
        assert params.temperature == 0 and params.max_tokens == model.max_new_tokens


@pytest.mark.parametrize("kind", ["mcq", "multi"])
def test_request_equals_vlmevalkit_vllm_input(card, vlmeval_qwen25, lmudata, kind):
    """What VLMEvalKit's Qwen2VLChat.generate_inner_vllm hands vLLM: the same text and pixels, greedy."""
    name = write_dataset(lmudata, MMB, mmbench_rows(6)) if kind == "mcq" else kind_dataset(lmudata, "multi", 6)
    _assert_requests_equal_vlmevalkit_vllm(dataclasses.replace(card, max_new_tokens=2048), vlmeval_qwen25, name)


def test_system_prompt_and_custom_prompt_apply_as_vlmevalkit(card, monkeypatch, lmudata):
    """QVQ's entry: its system prompt replaces the template's default turn, its custom MCQ prompt applies."""
    qvq = entries()["QVQ-72B-Preview"].args
    model = vlmeval_model(monkeypatch, card, "QVQ-72B-Preview", max_new_tokens=qvq["max_new_tokens"])
    ours = dataclasses.replace(card, options={**card.options, "system_prompt": qvq["system_prompt"]},
                               prompt_attrs={"_use_custom_prompt": True}, max_new_tokens=qvq["max_new_tokens"])
    write_dataset(lmudata, MMB, mmbench_rows(4))
    _assert_requests_equal_vlmevalkit_vllm(ours, model, MMB)
    request = requests_for(ours, MMB, 1)[0]
    assert request.prompt.startswith(f"<|im_start|>system\n{qvq['system_prompt']}<|im_end|>")
    assert "Please select the correct answer from the options above." in request.prompt


def test_multi_image_rows_reach_the_request_in_order(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=card.vllm_args["limit_mm_per_prompt"]["image"])


@pytest.fixture(scope="module")
def data_name():
    import os
    from pathlib import Path

    return write_dataset(Path(os.environ["LMUData"]), NAME, mmbench_rows(12, seed=11))


@pytest.fixture(scope="module")
def vllm_answers(card, data_name):
    """The tiny Qwen2.5-VL on vLLM: 12 rows batched and one at a time (equal), then an eval through it."""
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(card)
    try:
        answers = assert_batched_equals_alone(engine, requests_for(card, data_name, 12))
        yield engine, answers
    finally:
        engine.close()


@pytest.mark.engine
def test_eval_on_vllm_writes_files_and_scores(card, vllm_answers, data_name, tmp_path):
    assert_eval_through_engine(card, vllm_answers[0], tmp_path, data_name, 8)


@pytest.mark.engine
def test_transformers_batched_equals_vllm(card, vllm_answers, data_name, tmp_path):
    """`vlm-batch eval --engine hf` in batches of 4: the same greedy answers as vLLM gave (float32 both)."""
    result, predictions = cli_eval("tiny-qwen2.5-vl", data_name, tmp_path, "hf", 12, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "items 12: generated 12, resumed 0, failed 0" in result.output and "score:" in result.output
    assert same_text(predictions) == same_text(vllm_answers[1])


def same_text(answers: dict) -> dict:
    """Answers as both engines' texts can be compared: a random model's answer may end inside a UTF-8
    character, which transformers decodes to U+FFFD and vLLM's incremental detokenizer holds back."""
    return {i: text.rstrip("\ufffd") for i, text in answers.items()}


@pytest.mark.engine
def test_a_users_checkpoint_from_a_config_class_entry_answers_as_the_card(card, vllm_answers, data_name, tmp_path):
    """VLMEvalKit's `{"class": "Qwen2VLChat", "model_path": ...}` with the tiny card's arguments: the same
    answers, through the plugin serving the class, on transformers."""
    import json

    import pandas as pd
    from click.testing import CliRunner
    from openpyxl.utils.escape import unescape

    from vlm_batch.cli import cli

    config = tmp_path / "suite.json"
    config.write_text(json.dumps({"model": {"my-ft": {"class": "Qwen2VLChat", "model_path": card.path(),
                                                      "max_new_tokens": card.max_new_tokens, **card.options}},
                                  "data": {data_name: {}}}))
    result = CliRunner().invoke(cli, ["eval", "--config", str(config), "--engine", "hf", "--limit", "6",
                                      "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = pd.read_excel(tmp_path / "my-ft" / f"my-ft_{data_name}.xlsx")
    got = {i: unescape(str(p)) for i, p in zip(data["index"], data["prediction"])}
    assert same_text(got) == same_text({i: vllm_answers[1][i] for i in got})
