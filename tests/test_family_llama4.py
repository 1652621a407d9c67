"""Llama 4: VLMEvalKit's prompts and vLLM input, `<|eot|>` stripping, a tiny real Llama 4 on vLLM (CPU)."""

import pytest

from family_helpers import (MMB, assert_kind_parity, assert_multi_image_requests, assert_batched_equals_alone, assert_eval_through_engine,
                            assert_prompt_parity, cli_eval, recording, requests_for, stub_loader)
from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model
from vlm_batch.prepare import prepare
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

NAME = "VLMBatchLlama4"


@pytest.fixture(scope="module")
def card():
    return get_model("tiny-llama4")


@pytest.fixture
def vlmeval_llama4(monkeypatch, card):
    """VLMEvalKit's real `llama4` on the tiny checkpoint's processor; weights stubbed, generate recorded."""
    import transformers
    from vlmeval.vlm.llama4 import llama4

    monkeypatch.setattr(transformers.Llama4ForConditionalGeneration, "from_pretrained", stub_loader)
    return recording(llama4(model_path=card.path()))


def test_card_serves_vlmevalkit_name():
    from vlmeval.config import supported_VLM

    card, entry = get_model("Llama-4-Scout-17B-16E-Instruct"), supported_VLM["Llama-4-Scout-17B-16E-Instruct"]
    assert card.checkpoint == entry.keywords["model_path"] and entry.keywords["use_vllm"]
    assert card.vllm_args["limit_mm_per_prompt"] == {"image": 10} and card.max_new_tokens == 4096


def test_messages_equal_vlmevalkit_loop(card, vlmeval_llama4, lmudata, tmp_path):
    ours = assert_prompt_parity(card, vlmeval_llama4, lmudata, tmp_path)
    assert all("Please select the correct answer" in m[-1]["value"] for m in ours)   # MMBench's own prompt


def test_request_equals_vlmevalkit_vllm_input(card, vlmeval_llama4, lmudata):
    """VLMEvalKit's vLLM path: the same chat text (less the BOS the tokenizer adds) and the same images."""

    write_dataset(lmudata, MMB, mmbench_rows(6))
    dataset = load_dataset(MMB)
    build = prompt_builder(card, dataset)
    tokenizer = vlmeval_llama4.processor.tokenizer
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare(card, row["index"], message, MMB)
        content, images = vlmeval_llama4.message_to_promptimg_vllm(message, dataset=MMB)
        text = vlmeval_llama4.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            tokenize=False, add_generation_prompt=True)
        assert "<|begin_of_text|>" + request.prompt == text
        assert tokenizer(request.prompt)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        # vLLM's example format: one <|image|> per image in the text, images in multi_modal_data.
        assert request.prompt.count("<|image|>") == len(request.images) == len(images) == 1
        assert [im.tobytes() for im in request.images] == [im.convert("RGB").tobytes() for im in images]


def test_images_beyond_vlmevalkit_limit_are_dropped_as_it_does(card):
    from PIL import Image

    from vlm_batch.plugins import hooks

    real = get_model("Llama-4-Scout-17B-16E-Instruct")
    picture = Image.new("RGB", (32, 32), "red")
    message = [{"type": "image", "image": picture}] * 12 + [{"type": "text", "value": "Which?"}]
    request = hooks(real).prepare(message, "X")
    assert len(request.images) == request.prompt.count("<|image|>") == 10


def test_trailing_eot_is_stripped():
    from vlm_batch_llama4 import strip_eot

    assert strip_eot("B<|eot|>") == "B" and strip_eot("B") == "B" and strip_eot("<|eot|>B") == "<|eot|>B"
    assert strip_eot(None) is None


@pytest.fixture(scope="module")
def vllm_engine(card):
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(card)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def data_name():
    import os
    from pathlib import Path

    return write_dataset(Path(os.environ["LMUData"]), NAME, mmbench_rows(16, seed=11))


@pytest.mark.engine
def test_vllm_batched_equals_one_at_a_time(card, vllm_engine, data_name):
    assert_batched_equals_alone(vllm_engine, requests_for(card, data_name, 16))


@pytest.mark.engine
def test_eval_on_vllm_writes_files_and_scores(card, vllm_engine, data_name, tmp_path):
    assert_eval_through_engine(card, vllm_engine, tmp_path, data_name, 8)


@pytest.mark.engine
def test_transformers_batched_equals_one_at_a_time_in_bfloat16(card, data_name):
    """Llama 4's image processor always returns bfloat16 pixels, so here the model runs in bfloat16.

    bfloat16 rounding depends on the batch's shape, so a random-weight model's long answers drift
    apart after a few near-tie tokens (as on any engine); the first tokens must still agree."""
    import dataclasses

    import torch

    from vlm_batch.engines.hf import HFEngine

    engine = HFEngine(card, batch_size=8, dtype=torch.bfloat16)
    try:
        short = [dataclasses.replace(r, max_new_tokens=3) for r in requests_for(card, data_name, 12)]
        assert_batched_equals_alone(engine, short)
    finally:
        engine.close()


@pytest.mark.engine
def test_cli_eval_on_transformers_cpu(data_name, tmp_path):
    result, predictions = cli_eval("tiny-llama4", data_name, tmp_path, "hf", 4)
    assert result.exit_code == 0, result.output
    assert "items 4: generated 4, resumed 0, failed 0" in result.output, result.output


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_llama4, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_llama4, lmudata, tmp_path, kind)


def test_multi_image_rows_reach_the_request_as_vlmevalkit_limits_them(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=card.options["max_images"])
