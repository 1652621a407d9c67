"""OmniLMM and MiniCPM-V: honest engines and errors for OmniLMM_12B; a tiny real MiniCPM-V 4.6 on both engines."""

import pytest

from family_helpers import (MMB, assert_batched_equals_alone, assert_eval_through_engine, assert_kind_parity,
                            assert_multi_image_requests, assert_prompt_parity,
                            cli_eval, our_messages, prepare_request, recording, requests_for)
from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

NAME = "VLMBatchMiniCPM"


@pytest.fixture
def omnilmm():
    return get_model("OmniLMM_12B")


@pytest.fixture
def vlmeval_omnilmm(monkeypatch, tmp_path):
    """VLMEvalKit's real `OmniLMM12B`, its omnilmm loading stubbed, generate recorded."""
    import sys

    import vlmeval.vlm.omnilmm as omni

    from family_helpers import Stub

    monkeypatch.setattr(omni, "init_omni_lmm", lambda path: (Stub(), None, 64, None))
    monkeypatch.setattr(omni.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(sys, "path", list(sys.path))   # its constructor appends `root` to sys.path
    return recording(omni.OmniLMM12B(model_path="openbmb/OmniLMM-12B", root=str(tmp_path)))


def test_omnilmm_has_transformers_only_and_vllm_is_a_clear_error(tmp_path, lmudata):
    from vlmeval.config import supported_VLM

    write_dataset(lmudata, NAME, mmbench_rows(4))
    assert get_model("OmniLMM_12B").engines == ("hf",)
    assert supported_VLM["OmniLMM_12B"].keywords["model_path"] == "openbmb/OmniLMM-12B"
    result, _ = cli_eval("OmniLMM_12B", NAME, tmp_path, "vllm", 2)
    assert result.exit_code == 2
    assert "Model 'OmniLMM_12B' has no vllm engine; it runs on: hf" in result.output


def test_omnilmm_without_its_code_names_what_to_install(tmp_path, lmudata):
    import importlib.util

    if importlib.util.find_spec("omnilmm") is not None:
        pytest.skip("OpenBMB's omnilmm code is installed here")
    write_dataset(lmudata, NAME, mmbench_rows(4))
    result, _ = cli_eval("OmniLMM_12B", NAME, tmp_path, "hf", 2)
    assert result.exit_code == 2
    assert "needs OpenBMB's `omnilmm` code" in result.output and "OmniLMM" in result.output
    assert "Traceback" not in result.output


def test_omnilmm_messages_equal_vlmevalkit_loop(omnilmm, vlmeval_omnilmm, lmudata, tmp_path):
    ours = assert_prompt_parity(omnilmm, vlmeval_omnilmm, lmudata, tmp_path)
    assert all(m[0]["value"].startswith("\nStudy the image carefully") for m in ours)   # its custom MCQ prompt


def test_omnilmm_request_is_vlmevalkit_text_and_first_image(omnilmm, vlmeval_omnilmm, lmudata):
    from PIL import Image

    write_dataset(lmudata, MMB, mmbench_rows(4))
    dataset = load_dataset(MMB)
    build = prompt_builder(omnilmm, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare_request(omnilmm, message, MMB)
        prompt, image_path = vlmeval_omnilmm.message_to_promptimg(message, dataset=MMB)
        assert request.prompt == prompt
        assert [im.tobytes() for im in request.images] == [Image.open(image_path).convert("RGB").tobytes()]


def test_minicpm_uses_the_dataset_prompt(lmudata):
    """VLMEvalKit has no MiniCPM-V 4.6 class: the dataset's own prompt, as its loop would build it."""
    write_dataset(lmudata, MMB, mmbench_rows(8))
    dataset = load_dataset(MMB)
    expected = [dataset.build_prompt(dataset.data.iloc[i]) for i in range(len(dataset.data))]
    assert our_messages(get_model("MiniCPM-V-4_6"), MMB) == expected


@pytest.fixture(scope="module")
def card():
    return get_model("tiny-minicpm-v")


def test_minicpm_request_uses_the_checkpoint_chat_template(card, lmudata):
    from transformers import AutoProcessor

    write_dataset(lmudata, MMB, mmbench_rows(4))
    processor = AutoProcessor.from_pretrained(card.path())
    dataset = load_dataset(MMB)
    build = prompt_builder(card, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare_request(card, message, MMB)
        content = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["value"]} for p in message]
        assert request.prompt == processor.apply_chat_template([{"role": "user", "content": content}],
                                                               tokenize=False, add_generation_prompt=True)
        # vLLM's MiniCPM-V 4.6 format: one <|image_pad|> per image, expanded by its processor.
        assert request.prompt.count("<|image_pad|>") == len(request.images) == 1
        assert request.prompt.startswith("<|im_start|>user\n<|image_pad|>")


@pytest.fixture(scope="module")
def vllm_engine(card):
    """vLLM-CPU runs MiniCPM-V 4.6's Qwen3.5 linear-attention (GDN) layers only in bfloat16."""
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(card)   # the card asks for bfloat16 off-GPU
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def data_name():
    import os
    from pathlib import Path

    return write_dataset(Path(os.environ["LMUData"]), NAME, mmbench_rows(16, seed=5))


@pytest.mark.engine
def test_vllm_batched_equals_one_at_a_time(card, vllm_engine, data_name):
    assert_batched_equals_alone(vllm_engine, requests_for(card, data_name, 16), min_distinct=2)


@pytest.mark.engine
def test_eval_on_vllm_writes_files_and_scores(card, vllm_engine, data_name, tmp_path):
    assert_eval_through_engine(card, vllm_engine, tmp_path, data_name, 8)


@pytest.mark.engine
def test_cli_eval_on_transformers_batched_equals_one_at_a_time(card, data_name, tmp_path):
    from vlm_batch.engines.hf import HFEngine

    result, predictions = cli_eval("tiny-minicpm-v", data_name, tmp_path, "hf", 12, "--batch-size", "6")
    assert result.exit_code == 0, result.output
    assert "items 12: generated 12, resumed 0, failed 0" in result.output and "score:" in result.output
    engine = HFEngine(card, batch_size=1)
    try:
        alone = {r.index: r.text for r in engine.generate(requests_for(card, data_name, 12))}
    finally:
        engine.close()
    assert predictions == alone
    assert len(set(alone.values())) >= 2


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(omnilmm, vlmeval_omnilmm, lmudata, tmp_path, kind):
    assert_kind_parity(omnilmm, vlmeval_omnilmm, lmudata, tmp_path, kind)


def test_multi_image_rows_reach_the_request_as_vlmevalkit_limits_them(omnilmm, lmudata):
    assert_multi_image_requests(omnilmm, lmudata, limit=1)


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_minicpm_messages_of_every_kind_are_the_dataset_prompt(lmudata, kind):
    from family_helpers import kind_dataset

    name = kind_dataset(lmudata, kind)
    dataset = load_dataset(name)
    expected = [dataset.build_prompt(dataset.data.iloc[i]) for i in range(len(dataset.data))]
    assert our_messages(get_model("MiniCPM-V-4_6"), name) == expected


def test_minicpm_multi_image_rows_reach_the_request_with_every_image(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=card.options["max_images"])
