"""Molmo: VLMEvalKit's custom prompts, the vLLM request, and the remote-code opt-in.

No tiny Molmo can be built here: transformers has no Molmo (v1) class (the architecture lives in the
checkpoint's remote code), and vLLM's `MolmoForCausalLM` loads its processor through that code. So the
request that would be sent is checked against VLMEvalKit's own input and vLLM's Molmo format instead.
"""

import pytest

from family_helpers import MMB, assert_kind_parity, assert_multi_image_requests, assert_prompt_parity, prepare_request, recording, stub_loader
from helpers import mmbench_rows, write_dataset
from vlm_batch.plugins import get_model
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.prompts import prompt_builder

NAMES = ("molmoE-1B-0924", "molmo-7B-D-0924", "molmo-7B-O-0924", "molmo-72B-0924")


@pytest.fixture
def card():
    return get_model("molmo-7B-D-0924")


@pytest.fixture
def vlmeval_molmo(monkeypatch):
    """VLMEvalKit's real `molmo`, its remote-code model and processor loading stubbed, generate recorded."""
    import transformers
    from vlmeval.vlm.molmo import molmo

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stub_loader)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", stub_loader)
    return recording(molmo(model_path="allenai/Molmo-7B-D-0924"))


def test_cards_serve_vlmevalkit_names_and_need_remote_code():
    from vlmeval.config import supported_VLM

    for name in NAMES:
        card = get_model(name)
        assert card.checkpoint == supported_VLM[name].keywords["model_path"]
        assert card.trust_remote_code and card.engines == ("vllm", "hf")
        assert card.vllm_args["limit_mm_per_prompt"] == {"image": 1}   # as vLLM's Molmo example


def test_messages_equal_vlmevalkit_loop(card, vlmeval_molmo, lmudata, tmp_path):
    ours = assert_prompt_parity(card, vlmeval_molmo, lmudata, tmp_path)
    # Molmo's own MCQ prompt: "a_okvqa_mc: <hint>\n<question>\nA: ..." text first, then the image.
    assert all(m[0]["type"] == "text" and m[0]["value"].startswith("a_okvqa_mc: ") for m in ours)
    assert all("\nA: " in m[0]["value"] for m in ours)


def test_request_equals_vlmevalkit_input_in_vllm_molmo_format(card, vlmeval_molmo, lmudata):
    """The text Molmo's processor gets from VLMEvalKit, in the role format vLLM's Molmo processor
    re-tokenizes; the first image only; no image placeholder in the text (vLLM inserts the image
    tokens after the BOS token itself)."""
    from PIL import Image
    from vllm.model_executor.models.molmo import MolmoForCausalLM

    assert MolmoForCausalLM.get_placeholder_str("image", 1) is None
    write_dataset(lmudata, MMB, mmbench_rows(6))
    dataset = load_dataset(MMB)
    build = prompt_builder(card, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare_request(card, message, MMB)
        prompt, image_path = vlmeval_molmo.message_to_promptimg(message, dataset=MMB)
        assert request.prompt == f"User: {prompt} Assistant:"
        assert "<image>" not in request.prompt and "<|image|>" not in request.prompt
        assert [im.tobytes() for im in request.images] == [Image.open(image_path).convert("RGB").tobytes()]
        assert request.mm_kwargs == {"max_crops": 36} and request.max_new_tokens == 200


def test_only_the_first_image_is_used(card, tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    message = [{"type": "text", "value": "Which colour?"}] + [{"type": "image", "value": p} for p in paths]
    request = prepare_request(card, message, "SomeVQA")
    assert len(request.images) == 1 and request.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert request.prompt == "User: Which colour? Assistant:"


def test_ai2d_option_answers_become_letters():
    from vlm_batch_molmo import letter_for

    prompt = "ai2_diagram_no_letter: Which is the magma chamber?\nK\nB\nC\nH"
    assert letter_for(prompt, "C") == "C" and letter_for(prompt, "K") == "A" and letter_for(prompt, "H") == "D"
    assert letter_for(prompt, "none of them") == "none of them"


def test_refuses_to_run_without_trust_remote_code(tmp_path):
    from click.testing import CliRunner

    from vlm_batch.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--model", "molmo-7B-D-0924", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "runs code shipped with its checkpoint; pass --trust-remote-code" in result.output
    assert not (tmp_path / "molmo-7B-D-0924").exists()


def test_image_tokens_follow_molmo_crops(card):
    from vlm_batch_molmo import image_tokens

    def tokens(w, h):
        return image_tokens(card, w, h)

    assert tokens(112, 112) == tokens(336, 336) < tokens(1000, 700) < tokens(4000, 3000)


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_molmo, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_molmo, lmudata, tmp_path, kind)


def test_multi_image_rows_reach_the_request_as_vlmevalkit_limits_them(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=1)
