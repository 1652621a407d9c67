"""Prompt parity: vlm-batch sends what VLMEvalKit's own loop would send for the same model and data.

The oracle is VLMEvalKit itself: its `infer_data_job` runs over a real `Qwen2VLChat` (weights
replaced by a stand-in, since only prompts are compared) whose `generate` records each message
(the `vlmeval_qwen` fixture in conftest.py).
"""

import pytest

from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model
from vlm_batch.prepare import prepare
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

# An official MMBench-style MCQ name VLMEvalKit loads from $LMUData without an MD5 check.
MMB = "MMBench_V11_MINI"


def vlmeval_messages(model, dataset, work_dir):
    from vlmeval.inference import infer_data_job

    infer_data_job(model, work_dir=str(work_dir), model_name="Qwen2-VL-2B-Instruct", dataset=dataset)
    return [m for m, _ in model.recorded.values()]


@pytest.mark.parametrize("name", [MMB, "VLMBatchShapesParity"])
def test_messages_equal_vlmevalkit_loop(lmudata, tmp_path, vlmeval_qwen, tiny_card, name):
    write_dataset(lmudata, name, mmbench_rows(12))
    expected = vlmeval_messages(vlmeval_qwen, load_dataset(name), tmp_path)
    dataset = load_dataset(name)  # VLMEvalKit's job drops the image column in place
    build = prompt_builder(tiny_card, dataset)
    ours = [build(dataset.data.iloc[i]) for i in range(len(dataset.data))]
    assert len(expected) == len(ours) == 12
    assert ours == expected
    custom = name == MMB   # Qwen2-VL's own MCQ prompt applies to known MCQ sets only
    assert all(m[-1]["value"].endswith("Please select the correct answer from the options above.")
               or m[-1]["value"].endswith("请直接回答选项字母。") for m in ours) == custom


def test_engine_request_equals_vlmevalkit_vllm_input(lmudata, vlmeval_qwen, tiny_card):
    """After prepare: the same chat text and the same resized pixels VLMEvalKit gives vLLM."""
    from qwen_vl_utils import process_vision_info

    write_dataset(lmudata, MMB, mmbench_rows(6))
    dataset = load_dataset(MMB)
    build = prompt_builder(tiny_card, dataset)
    for i in range(len(dataset.data)):
        message = build(dataset.data.iloc[i])
        request = prepare(tiny_card, dataset.data.iloc[i]["index"], message, MMB)
        messages = [{"role": "user", "content": vlmeval_qwen._prepare_content_vllm(message, dataset=MMB)}]
        text = vlmeval_qwen.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images, _ = process_vision_info(messages)
        assert request.prompt == text
        assert [im.size for im in request.images] == [im.size for im in images]
        assert [im.tobytes() for im in request.images] == [im.tobytes() for im in images]


def test_real_qwen2_vl_cards_use_vlmevalkit_pixels():
    from vlmeval.config import supported_VLM

    for name in ("Qwen2-VL-2B-Instruct", "Qwen2-VL-7B-Instruct", "Qwen2-VL-72B-Instruct"):
        card, entry = get_model(name), supported_VLM[name]
        assert card.checkpoint == entry.keywords["model_path"]
        assert card.options == {k: entry.keywords[k] for k in ("min_pixels", "max_pixels")}


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(lmudata, tmp_path, vlmeval_qwen, tiny_card, kind):
    from family_helpers import kind_dataset

    name = kind_dataset(lmudata, kind)
    expected = vlmeval_messages(vlmeval_qwen, load_dataset(name), tmp_path)
    dataset = load_dataset(name)
    build = prompt_builder(tiny_card, dataset)
    ours = [build(dataset.data.iloc[i]) for i in range(len(dataset.data))]
    assert len(ours) == 8 and ours == expected
