"""The engines on the tiny checkpoint: batching never changes greedy answers, and the window stays full."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from vlm_batch.cli import cli
from vlm_batch.engines.hf import HFEngine, length_bucket
from vlm_batch.prepare import build_requests

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def hf_engine(tiny_card):
    engine = HFEngine(tiny_card, batch_size=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def requests(tiny_card, shapes):
    failures = []
    out = list(build_requests(tiny_card, shapes, failures))[:48]
    assert not failures
    return out


def recording(engine):
    """The engine's batches as it runs them (sizes and members)."""
    seen, original = [], engine.run_batch

    def run_batch(batch):
        seen.append(list(batch))
        return original(batch)

    engine.run_batch = run_batch
    return seen


def test_hf_batched_equals_batch_of_one(hf_engine, requests):
    alone = {r.index: hf_engine.run_batch([r])[0].text for r in requests}
    seen = recording(hf_engine)
    try:
        batched = {r.index: r.text for r in hf_engine.generate(requests)}
    finally:
        del hf_engine.run_batch
    assert batched == alone
    assert max(len(b) for b in seen) == 16 and len(seen) < len(requests)
    assert len(set(alone.values())) > 5   # answers vary with the image: equality is not trivial


def test_hf_batches_group_similar_lengths(hf_engine, requests):
    from vlm_batch.memory import prompt_tokens

    long = dataclasses.replace(requests[0], prompt=requests[0].prompt + " Hint:" + " a longer prompt" * 20)
    long.prompt_tokens = prompt_tokens(hf_engine.card, long)
    mixed = [long] + requests[1:]
    seen = recording(hf_engine)
    try:
        list(hf_engine.generate(mixed))
    finally:
        del hf_engine.run_batch
    long_batch = next(b for b in seen if long in b)
    assert len({length_bucket(r.prompt_tokens) for r in long_batch}) == 1
    assert len(long_batch) == 1


def test_hf_memory_budget_splits_batches_before_sending(tiny_card, requests):
    from vlm_batch.memory import batch_bytes
    from vlm_batch.plugins import hooks

    per_request = max(batch_bytes(tiny_card, r, hooks(tiny_card).estimate_memory(r))
                      for r in requests)
    engine = HFEngine(tiny_card, batch_size=64, max_batch_memory=per_request * 5)
    try:
        seen = recording(engine)
        out = list(engine.generate(requests))
    finally:
        engine.close()
    assert len(out) == len(requests) and max(len(b) for b in seen) <= 5
    assert engine.last[0].causes["memory"] > 0


def test_vllm_stream_equals_one_at_a_time_and_window_never_empties(vllm_engine, requests):
    alone = {r.index: vllm_engine.run_batch([r])[0].text for r in requests}
    vllm_engine.window = 8   # far fewer than the 48 requests: the window must be refilled
    try:
        streamed = {r.index: r.text for r in vllm_engine.generate(requests)}
    finally:
        vllm_engine.window = 2 * vllm_engine.max_num_seqs
    assert streamed == alone
    stats = vllm_engine.stats
    assert stats.steps_with_pending > 0
    assert stats.min_in_flight_with_pending == 8   # refilled to full before every step
    assert stats.max_in_flight == 8


def test_text_only_requests_on_both_engines(hf_engine, vllm_engine, tiny_card, requests):
    """A message without an image (datasets whose VLMEvalKit class keeps such rows, as HiPhO's does)
    becomes a text-only request, which both engines answer, alone and beside image requests."""
    from vlm_batch.prepare import prepare

    questions = ["Is the sky blue? Please answer yes or no.", "What colour is grass?",
                 "Which shape has three sides?\nA. circle\nB. triangle", "Name a shape."]
    text_only = [prepare(tiny_card, 9000 + i, [{"type": "text", "value": q}], "HiPhO")
                 for i, q in enumerate(questions)]
    assert all(not r.images and "<|image_pad|>" not in r.prompt for r in text_only)
    mixed = requests[:6] + text_only
    answers = {}
    for engine in (hf_engine, vllm_engine):
        results = {r.index: r for r in engine.generate(mixed)}
        assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok]
        alone = {r.index: next(iter(engine.generate([r]))).text for r in text_only}
        assert {i: results[i].text for i in alone} == alone
        answers[engine.name] = alone
    assert answers["hf"] == answers["vllm"]


def test_bench_reports_modes_ratios_and_agreement(tmp_path):
    from PIL import Image

    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(cli, ["bench", "--engine", "hf", "--limit", "16", "--repeat", "2", "--json",
                                      str(out), "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["items_per_s"]) == {"one_at_a_time", "fixed_4", "vlm_batch", "pipeline"}
    assert all(v > 0 for v in report["items_per_s"].values())
    assert all(m["wall"] > 0 and m["this_process"] > 0 for m in report["ms_per_item"].values())
    assert report["same_predictions"] == {"one_at_a_time": True, "fixed_4": True, "vlm_batch": True,
                                          "pipeline": True}
    assert "vlm batch vs one at a time" in result.output and "identical" in result.output
    with Image.open(chart) as img:
        assert img.format == "PNG" and img.width > 400 and len(img.getcolors(1 << 16) or ()) > 10


def test_vllm_on_cpu_runs_the_model_in_its_one_engine_process(vllm_engine):
    """No separate worker to busy-wait on: the engine core holds the model."""
    import psutil

    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert names.count("VLLM::EngineCore") == 1, names
    assert not [n for n in names if "Worker" in n], names


def test_vllm_bench_turns_off_caches_only_repeats_would_hit(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--limit", "8", "--repeat", "1", "--json", str(out),
                                      "--chart", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    args = report["engine_details"]["args"]
    assert args["mm_processor_cache_gb"] == 0 and args["enable_prefix_caching"] is False
    assert report["caches_off"] == ["enable_prefix_caching", "mm_processor_cache_gb"]
    assert all(report["same_predictions"].values()) and report["warnings"] == []
    assert report["mean_output_tokens"] >= 1
    # VLMEvalKit's own loop (its Qwen2VLChat on its own vLLM engine) answered the same items alike
    assert "vlmeval_loop" in report["items_per_s"] and report["same_predictions"]["vlmeval_loop"]
    assert set(report["items_per_s_first_round"]) == set(report["items_per_s"])
    assert "VLMEvalKit" in report["modes"]["vlmeval_loop"] and "VLMEvalKit" not in report["modes"]["one_at_a_time"]
    batched = report["ms_per_item"]["vlm_batch"]
    # The model runs in the engine core: that child, not this process, does most of the batched work.
    assert batched["child_processes"] > batched["this_process"] > 0


def test_bench_warns_when_batches_were_split_or_retried():
    from vlm_batch.bench import _warnings

    assert _warnings({"processor": {"splits": 0, "fallbacks": 0, "failed": 0}, "failed_items": 0}) == []
    warned = _warnings({"processor": {"splits": 2, "fallbacks": 1, "failed": 1}, "failed_items": 1})
    assert [w.split()[:2] for w in warned] == [["2", "splits"], ["1", "fallbacks"], ["1", "items"]]
