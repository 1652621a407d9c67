"""Gemma 3: VLMEvalKit's prompts, the engine request, and a tiny real Gemma 3 on vLLM (CPU) and transformers."""

import pytest

from family_helpers import (MMB, assert_kind_parity, assert_multi_image_requests, assert_batched_equals_alone, assert_eval_through_engine,
                            assert_prompt_parity, cli_eval, requests_for, stub_loader)
from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model
from vlm_batch.prepare import prepare
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

NAME = "VLMBatchGemma3"   # a local MMBench-style set (dataset prompt), for the engine runs


@pytest.fixture(scope="module")
def card():
    return get_model("tiny-gemma3")


@pytest.fixture
def vlmeval_gemma3(monkeypatch, card):
    """VLMEvalKit's real `Gemma3` on the tiny checkpoint's processor; weights stubbed, generate recorded."""
    import transformers
    from vlmeval.vlm.gemma import Gemma3

    from family_helpers import recording

    monkeypatch.setattr(transformers.Gemma3ForConditionalGeneration, "from_pretrained", stub_loader)
    return recording(Gemma3(model_path=card.path()))


def test_cards_serve_vlmevalkit_names():
    from vlmeval.config import supported_VLM

    for name in ("Gemma3-4B", "Gemma3-12B", "Gemma3-27B"):
        card = get_model(name)
        assert card.checkpoint == supported_VLM[name].keywords["model_path"]
        assert card.engines == ("vllm", "hf") and card.vllm_args["limit_mm_per_prompt"] == {"image": 24}


def test_messages_equal_vlmevalkit_loop(card, vlmeval_gemma3, lmudata, tmp_path):
    ours = assert_prompt_parity(card, vlmeval_gemma3, lmudata, tmp_path)
    # Gemma3 has no custom prompt: MMBench's own prompt, image first.
    assert all(m[0]["type"] == "image" and "Please select the correct answer" in m[-1]["value"] for m in ours)


def test_request_equals_vlmevalkit_transformers_input(card, vlmeval_gemma3, lmudata):
    """Same chat text (system prompt kept, texts trimmed), same token ids (one <bos>), same pixels."""
    import torch
    from PIL import Image


    write_dataset(lmudata, MMB, mmbench_rows(6))
    dataset = load_dataset(MMB)
    build = prompt_builder(card, dataset)
    processor = vlmeval_gemma3.processor
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare(card, row["index"], message, MMB)
        chat = vlmeval_gemma3.message2pipeline(message)
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert chat[0]["role"] == "system" and text.startswith("<bos><start_of_turn>user\nYou are a helpful")
        assert "<bos>" + request.prompt == text
        # The same chat with each image path opened as a picture (this torchvision cannot decode files).
        opened = [dict(turn, content=[{"type": "image", "image": Image.open(c["url"]).convert("RGB")}
                                      if c["type"] == "image" else c for c in turn["content"]]) for turn in chat]
        theirs = processor.apply_chat_template(opened, tokenize=True, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
        mine = processor(text=[request.prompt], images=[request.images], return_tensors="pt")
        assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert mine["input_ids"][0].tolist().count(processor.tokenizer.bos_token_id) == 1
        assert torch.equal(mine["pixel_values"], theirs["pixel_values"])
        assert request.prompt.count("<start_of_image>") == len(request.images) == 1


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

    return write_dataset(Path(os.environ["LMUData"]), NAME, mmbench_rows(16, seed=7))


@pytest.mark.engine
def test_vllm_batched_equals_one_at_a_time(card, vllm_engine, data_name):
    assert_batched_equals_alone(vllm_engine, requests_for(card, data_name, 16))


@pytest.mark.engine
def test_eval_on_vllm_writes_files_and_scores(card, vllm_engine, data_name, tmp_path):
    assert_eval_through_engine(card, vllm_engine, tmp_path, data_name, 8)


@pytest.mark.engine
def test_cli_eval_on_transformers_batched_equals_one_at_a_time(card, data_name, tmp_path):
    from vlm_batch.engines.hf import HFEngine

    result, predictions = cli_eval("tiny-gemma3", data_name, tmp_path, "hf", 12, "--batch-size", "6")
    assert result.exit_code == 0, result.output
    assert "items 12: generated 12, resumed 0, failed 0" in result.output and "score:" in result.output
    engine = HFEngine(card, batch_size=1)
    try:
        alone = {r.index: r.text for r in engine.generate(requests_for(card, data_name, 12))}
    finally:
        engine.close()
    assert predictions == alone
    assert len(set(alone.values())) >= 3


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_gemma3, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_gemma3, lmudata, tmp_path, kind)


def test_multi_image_rows_reach_the_request_as_vlmevalkit_limits_them(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=card.options["max_images"])
