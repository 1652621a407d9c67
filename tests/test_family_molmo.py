"""Molmo: VLMEvalKit's custom prompts, the request, and the tiny Molmo generating on both engines.

The tiny Molmo (`vlm_batch_testing.molmo`) is a random-weight tiny language model and connector with
the full-size 300M vision tower vLLM's `MolmoForCausalLM` always builds, and our own remote code
(config, processor, transformers model). So each image costs seconds here (the global view and one
crop): the engine tests share one vLLM engine and a few rows of each sample set, and the checks after
the first run lean on vLLM's encoder and prefix caches, which make an image it has seen nearly free.
What this verifies: our requests, vLLM's Molmo model, and the interface of our processing code; not
the numerics of the real checkpoints' own processor.
"""

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from family_helpers import (MMB, assert_kind_parity, assert_multi_image_requests, assert_prompt_parity, kind_dataset,
                            prepare_request, recording, requests_for, stub_loader)
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


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_molmo, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_molmo, lmudata, tmp_path, kind)


def test_multi_image_rows_reach_the_request_as_vlmevalkit_limits_them(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=1)


def test_blink_rows_become_vlmevalkits_side_by_side_image(card, vlmeval_molmo, lmudata):
    """BLINK's several images reach Molmo as one, joined as VLMEvalKit's `molmo` joins them."""
    from PIL import Image

    name = kind_dataset(lmudata, "multi", 4)
    dataset = load_dataset(name)
    build = prompt_builder(card, dataset)
    for _, row in dataset.data.iterrows():
        message = build(row)
        request = prepare_request(card, message, "BLINK")
        _, joined = vlmeval_molmo.message_to_promptimg(message, dataset="BLINK")
        assert [im.tobytes() for im in request.images] == [Image.open(joined).convert("RGB").tobytes()]
        assert request.images[0].height == 512 and request.images[0].width > 512


# -- the tiny Molmo ---------------------------------------------------------------------------------

SETS = ("VLMBatchShapes", "VLMBatchShapesYN", "VLMBatchShapesVQA", "VLMBatchShapesMulti")
LIMIT = 2   # rows of each sample set: every row costs a pass of the 300M vision tower on each engine


@pytest.fixture(scope="module")
def tiny():
    return get_model("tiny-molmo")


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny.path(), trust_remote_code=True)


def test_tiny_card_runs_the_plugins_remote_code_class():
    import vlm_batch_molmo

    tiny = get_model("tiny-molmo")
    assert tiny.plugin == tiny.family == "molmo" and tiny.trust_remote_code
    assert tiny.hf_class == vlm_batch_molmo.HF_CLASS and tiny.options == {"max_crops": 1}
    assert tiny.vllm_args["limit_mm_per_prompt"] == {"image": 1} and "random-weight Molmo" in tiny.description


def test_tiny_refuses_without_trust_remote_code_before_anything_loads(tmp_path):
    """One line, exit status 2; no heavy library imported, no checkpoint built, no work dir."""
    code = ("import sys\nfrom vlm_batch.cli import cli\n"
            "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exc:\n    status = exc.code\n"
            "print('STATUS', status, [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules])\n")
    env = dict(os.environ, VLM_BATCH_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", "tiny-molmo", "--dataset", SETS[0],
                           "--work-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "STATUS 2 []", proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "runs code shipped with its checkpoint; pass --trust-remote-code" in errors[0], errors
    assert not (tmp_path / "home" / "models").exists() and not (tmp_path / "out").exists()


def vllm_count(image_processor, width, height) -> int:
    """vLLM's own count of Molmo's image tokens for this image processor."""
    from vllm.model_executor.models.molmo import MolmoProcessingInfo

    info = MolmoProcessingInfo.__new__(MolmoProcessingInfo)   # the count reads only the image processor
    return info.get_num_image_tokens(image_width=width, image_height=height, image_processor=image_processor)


def test_image_tokens_equal_vllms_count_and_our_processors(tiny, processor):
    """The plugin's count against vLLM's Molmo count (its `select_tiling` re-derivation) over many
    sizes and crop limits, and against the tokens our processor lays out for a share of them."""
    import copy
    import random

    from PIL import Image
    from vlm_batch_molmo import image_tokens

    rng = random.Random(0)
    sizes = [(112, 112), (113, 113), (1, 1), (100, 50), (224, 224), (336, 336), (560, 336), (1024, 768),
             (768, 1024), (2000, 300), (111, 5000)] + [(rng.randint(20, 2500), rng.randint(20, 2500)) for _ in range(120)]
    ids = processor.tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_col>", "<im_start>", "<im_end>"])
    checked = 0
    for max_crops in (1, 2, 4, 6, 12, 36):
        card = dataclasses.replace(tiny, options={"max_crops": max_crops})
        image_processor = copy.copy(processor.image_processor)
        image_processor.max_crops = max_crops
        for i, (w, h) in enumerate(sizes):
            ours = image_tokens(card, w, h)
            assert ours == vllm_count(image_processor, w, h), (max_crops, w, h)
            if i % 6 == 0 and max_crops <= 12:   # laying the crops out costs; a share of the cases
                layout = image_processor.image_to_patches_and_tokens(Image.new("RGB", (w, h)), *ids, max_crops=max_crops)
                assert ours == len(layout[3]), (max_crops, w, h)
                checked += 1
    assert checked >= 100


@pytest.fixture(scope="module")
def molmo_vllm(tiny):
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny, trust_remote_code=True)
    yield engine
    engine.close()


def predictions(path) -> dict:
    import pandas as pd
    from openpyxl.utils.escape import unescape

    data = pd.read_excel(path, keep_default_na=False)
    return {i: unescape(str(p)) for i, p in zip(data["index"], data["prediction"])}


@pytest.fixture(scope="module")
def vllm_run(tiny, molmo_vllm, tmp_path_factory):
    """The first rows of every sample set through one engine, as `vlm-batch eval --model tiny-molmo
    --trust-remote-code --limit 2` runs them (the engine already started); (summaries, seconds)."""
    from vlm_batch.plan import DatasetSpec, ModelSpec, Plan
    from vlm_batch.settings import Settings
    from vlm_batch.suite import run_suite

    began = time.perf_counter()
    result = run_suite(Plan([ModelSpec(tiny, molmo_vllm)], [DatasetSpec(name) for name in SETS]),
                       Settings(work_dir=str(tmp_path_factory.mktemp("molmo-vllm")), limit=LIMIT))
    return result.summaries, time.perf_counter() - began


@pytest.fixture(scope="module")
def requests(tiny, tmp_path_factory):
    """The requests of those rows, plus a BLINK-style row of two images side by side asking for two
    crops (a grid of 1x2 windows): the per-request limit and a larger image reach vLLM."""
    out = [r for name in SETS for r in requests_for(tiny, name, LIMIT)]
    blink = prepare_request(tiny, blink_message(tmp_path_factory.mktemp("blink")), "BLINK")
    blink.index = "blink"
    return out + [dataclasses.replace(blink, mm_kwargs={"max_crops": 2})]


def blink_message(folder) -> list:
    import random

    from vlm_batch.demo.sample_data import draw

    rng, message = random.Random(5), []
    for i, (shape, colour) in enumerate([("circle", "red"), ("cross", "blue")]):
        path = str(folder / f"{i}.png")
        draw(shape, colour, rng).save(path)
        message.append({"type": "image", "value": path})
    return message + [{"type": "text", "value": "Which image shows a cross?"}]


@pytest.fixture(scope="module")
def vllm_outputs(tiny, molmo_vllm, vllm_run, requests):
    """vLLM's RequestOutputs (prompt and answer token ids) for `requests`, with the engine's greedy
    settings and Molmo's stop token; after `vllm_run`, only the BLINK row runs its vision tower."""
    from vllm import SamplingParams

    from vlm_batch_molmo import STOP

    eos = molmo_vllm.llm.get_tokenizer().convert_tokens_to_ids(STOP)
    params = SamplingParams(temperature=0.0, max_tokens=tiny.max_new_tokens, seed=0, stop_token_ids=[eos])
    prompts = [{"prompt": r.prompt, "multi_modal_data": {"image": r.images}, "mm_processor_kwargs": r.mm_kwargs}
               for r in requests]
    return molmo_vllm.llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.engine
@pytest.mark.slow
def test_sample_sets_answered_on_vllm(vllm_run, requests):
    summaries, seconds = vllm_run
    print(f"\ntiny-molmo on vLLM: {len(SETS) * LIMIT} rows in {seconds:.1f} s, {seconds / (len(SETS) * LIMIT):.1f} s a row")
    assert [s.dataset for s in summaries] == list(SETS)
    for summary in summaries:
        assert summary.engine == "vllm" and summary.generated == LIMIT and not summary.failed, summary
        assert os.path.exists(summary.prediction_file) and os.path.exists(summary.report_file)
        assert summary.score is not None and summary.eval_error is None, summary.eval_error
        assert not any(p.startswith("Failed to obtain answer") for p in predictions(summary.prediction_file).values())
    # Multi-image rows went in as VLMEvalKit's molmo takes them: their first image only.
    assert all(len(r.images) == 1 for r in requests)


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_prompt_ids_equal_our_processors(tiny, processor, requests, vllm_outputs):
    """vLLM re-tokenizes our prompt through the checkpoint's processor and inserts the image tokens
    itself; the result equals what our processor gives for the same text and image, and its image
    tokens number what the plugin counts."""
    from vlm_batch_molmo import image_tokens

    image_ids = set(processor.tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_col>", "<im_start>", "<im_end>"]))
    counts = {}
    for request, output in zip(requests, vllm_outputs):
        ours = processor.process(text=request.prompt, images=request.images, images_kwargs=request.mm_kwargs,
                                 text_kwargs={"message_format": "none", "always_start_with_space": True})
        assert list(output.prompt_token_ids) == ours["input_ids"].tolist(), request.index
        counts[request.index] = sum(t in image_ids for t in output.prompt_token_ids)
        card = dataclasses.replace(tiny, options=request.mm_kwargs)
        assert counts[request.index] == image_tokens(card, *request.images[0].size), request.index
    assert counts["blink"] > counts[requests[0].index]   # two crops asked for, two crops given


@pytest.mark.engine
@pytest.mark.slow
def test_predictions_are_vllms_answers_cleaned(vllm_run, requests, vllm_outputs):
    """What the files hold is the plugin's clean-up (the answer stripped) of vLLM's own answer text."""
    from vlm_batch_molmo import clean

    summaries, _ = vllm_run
    written = {(s.dataset, i): p for s in summaries for i, p in predictions(s.prediction_file).items()}
    for request, output in zip(requests, vllm_outputs):
        if request.index != "blink":
            assert written[request.dataset, request.index] == clean(request, output.outputs[0].text)


@pytest.mark.engine
@pytest.mark.slow
def test_memory_estimate_equals_vllms_kv_cache(tiny, molmo_vllm, processor, requests, vllm_outputs, monkeypatch):
    """The KV bytes vLLM holds for each request (its tokens, prompt and answer, at the bytes a token
    costs in the cache it allocated) equal the plugin's estimate for it, when the prompt's text is
    counted as our processor tokenizes it (BOS and leading space included; the core's word count,
    printed beside, is meant for real vocabularies): the image tokens and the bytes a token costs are
    the family's facts under test."""
    from vlm_batch import memory
    from vlm_batch.plugins import hooks

    cache = molmo_vllm.llm.llm_engine.vllm_config.cache_config
    per_token = cache.kv_cache_memory_bytes // (cache.num_gpu_blocks * cache.block_size)
    assert per_token == memory.kv_bytes_per_token(memory.model_config(tiny))
    print(f"\nvLLM's KV cache: {per_token} bytes a token\nrow                      tokens held   estimate  (word count)")
    for request, output in zip(requests, vllm_outputs):
        held = len(output.prompt_token_ids) + len(output.outputs[0].token_ids)
        card = dataclasses.replace(tiny, options=request.mm_kwargs)
        asked = dataclasses.replace(request, max_new_tokens=len(output.outputs[0].token_ids))
        words = hooks(card).estimate_memory(asked)
        with monkeypatch.context() as patch:
            patch.setattr(memory, "approx_text_tokens", lambda text: len(processor.process(
                text=text, text_kwargs={"message_format": "none", "always_start_with_space": True})["input_ids"]))
            estimate = hooks(card).estimate_memory(asked)
        print(f"{request.dataset + ' ' + str(request.index):24} {held:>5} {estimate // per_token:>10}  ({words // per_token})")
        assert estimate == held * per_token, (request.index, estimate, held * per_token)


@pytest.mark.engine
@pytest.mark.slow
def test_ai2d_answers_end_at_molmos_stop_token_and_become_letters(tiny, molmo_vllm, vllm_run, lmudata, tmp_path,
                                                                   monkeypatch):
    """AI2D rows whose options are single letters get VLMEvalKit's `ai2_diagram_no_letter` prompt (the
    bare options, one a line), and an answer equal to an option becomes that option's letter. A
    random model writes no option of its own accord, so vLLM's sampling holds it to the option texts
    and Molmo's end token, and a bias makes the end token follow the first one: each answer is then
    the model's greedy pick among the options, ended by the stop token 11 tokens early. (The rows'
    images are the sample set's first ones, which vLLM has seen: no vision tower runs.)"""
    from vlmeval.dataset import ImageMCQDataset

    from vlm_batch import runner
    from vlm_batch.demo import sample_data
    from vlm_batch_molmo import STOP

    options = ["K", "H", "A", "B"]   # none is its own letter, so the mapping shows
    rows = [{"index": row["index"], "image": row["image"], "question": "Which label marks the shape?",
             **dict(zip("ABCD", options)), "answer": "C", "abcLabel": True, "category": "shape", "split": "dev"}
            for row in sample_data.rows(LIMIT)]
    write_dataset(lmudata, "AI2D_TEST", rows)
    monkeypatch.delitem(ImageMCQDataset.DATASET_MD5, "AI2D_TEST")   # a local stand-in for the real file
    tokenizer = molmo_vllm.llm.get_tokenizer()
    end = tokenizer.convert_tokens_to_ids(STOP)
    held = dataclasses.replace(tiny, generation={
        "allowed_token_ids": [*tokenizer.convert_tokens_to_ids(options), end], "min_tokens": 1,
        "logit_bias": {end: 100.0}})
    monkeypatch.setattr(molmo_vllm, "card", held)   # the engine's sampling settings come from its card
    monkeypatch.setattr(molmo_vllm, "_params", {})

    summary = runner.run_eval(held, "AI2D_TEST", engine=molmo_vllm, work_dir=str(tmp_path))
    assert summary.generated == LIMIT and not summary.failed and summary.score is not None, summary
    written = predictions(summary.prediction_file)
    asked = requests_for(held, "AI2D_TEST")
    raw = {r.index: r for r in molmo_vllm.generate(asked, stop_tokens=(STOP,))}   # without the clean-up
    for request in asked:
        assert request.prompt.startswith("User: ai2_diagram_no_letter: Which label marks the shape?\nK\nH\nA\nB")
        answer = raw[request.index]
        assert answer.text in options and answer.output_tokens == 2 < held.max_new_tokens, answer
        assert written[request.index] == "ABCD"[options.index(answer.text)] != answer.text


@pytest.mark.engine
@pytest.mark.slow
def test_cli_on_transformers_gives_vllms_answers(processor, requests, vllm_outputs, vllm_run, tmp_path):
    """`vlm-batch eval --model tiny-molmo --trust-remote-code --engine hf` on the same rows runs the
    checkpoint's `generate_from_batch` on batches the plugin pads, and writes vLLM's greedy answers.

    Compared as the text transformers decodes from vLLM's answer token ids. vLLM's own detokenizer,
    which decodes as tokens arrive, holds back a byte sequence that is not yet whole UTF-8, also at
    the end of an answer, where `decode` writes U+FFFD; random byte-level answers do end so, and
    vLLM's texts are compared with those characters taken off the end."""
    from click.testing import CliRunner

    from vlm_batch.cli import cli
    from vlm_batch_molmo import clean

    began = time.perf_counter()
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-molmo", "--trust-remote-code", "--engine", "hf",
                                      "--dataset", *SETS, "--limit", str(LIMIT), "--work-dir", str(tmp_path)])
    seconds = time.perf_counter() - began
    print(f"\ntiny-molmo on transformers (CLI): {len(SETS) * LIMIT} rows in {seconds:.1f} s")
    assert result.exit_code == 0, result.output
    hf = {(name, i): p for name in SETS
          for i, p in predictions(tmp_path / "tiny-molmo" / f"tiny-molmo_{name}.xlsx").items()}
    summaries, _ = vllm_run
    vllm = {(s.dataset, i): p for s in summaries for i, p in predictions(s.prediction_file).items()}
    held_back = 0
    for request, output in zip(requests, vllm_outputs):
        if request.index == "blink":
            continue
        decoded = processor.tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
        assert hf[request.dataset, request.index] == clean(request, decoded), request.index
        assert vllm[request.dataset, request.index] == clean(request, decoded.rstrip("\ufffd")), request.index
        held_back += decoded.endswith("\ufffd")
    assert len(set(hf.values())) >= 3 and len(hf) == len(SETS) * LIMIT
    print(f"answers ending in an incomplete UTF-8 sequence: {held_back} of {len(hf)}")
