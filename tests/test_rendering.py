"""vLLM's rendering done by the preparation workers: the engine answers a worker-rendered request
exactly as one it rendered itself, and a request never reaches an engine that cannot take it."""

import resource
import subprocess
import sys

import pytest

from helpers import write_dataset
from vlm_batch.demo import photos
from vlm_batch.engines.rendering import Rendering
from vlm_batch.engines.start import EngineStart
from vlm_batch.engines.vllm import engine_args, rendering
from vlm_batch.placement.stream import answered
from vlm_batch.prepare import Preparer, rows_of
from vlm_batch.request import Result
from vlm_batch.vlmeval.datasets import load_dataset

N = 16


@pytest.fixture(scope="module")
def photo_set():
    import os
    from pathlib import Path

    return load_dataset(write_dataset(Path(os.environ["LMUData"]), "RenderPhotos",
                                      photos.rows("VLMBatchPhotos", seed=11, n=N)))


def prepared(card, dataset, workers, render=None):
    failures: list = []
    with Preparer(card, {dataset.dataset_name: dataset}, workers, rendering=render) as preparer:
        requests = list(preparer.requests(failures, rows_of(dataset)))
    assert not failures, failures[0].error
    return requests


def answers(engine, requests) -> dict:
    return {r.index: (r.text, r.prompt_tokens, r.error) for r in engine.generate(requests)}


@pytest.mark.engine
def test_worker_rendered_requests_are_answered_as_rendered_here(vllm_engine, tiny_card, photo_set):
    here = prepared(tiny_card, photo_set, 0)
    with Preparer(tiny_card, {photo_set.dataset_name: photo_set}, 2, rendering=rendering(tiny_card, {})) as pre:
        there = list(pre.requests([], rows_of(photo_set)))
    assert all(r.rendered is None and len(r.images) == 1 for r in here)
    assert all(vllm_engine.takes(r) for r in there)
    assert all(r.images == [] and r.shape == (photo_set.dataset_name, 1) for r in there)   # not sent back
    expected = answers(vllm_engine, here)
    assert answers(vllm_engine, there) == expected
    assert len(expected) == N and all(error is None and tokens > 0 for _, tokens, error in expected.values())
    # Sent, each input was let go (its shared-memory descriptors with it); an engine given them again,
    # as a restart does, gets each row prepared again
    assert not any(vllm_engine.takes(r) for r in there)
    again = {r.index: (r.text, r.prompt_tokens, r.error)
             for r in answered(tiny_card, EngineStart.running(vllm_engine), there, unrendered=pre.unrendered)}
    assert again == expected


@pytest.mark.engine
def test_a_request_rendered_for_other_arguments_fails_alone(vllm_engine, tiny_card, photo_set):
    other = prepared(tiny_card, photo_set, 2, rendering(tiny_card, {"max_model_len": 1024}))[:3]
    plain = prepared(tiny_card, photo_set, 0)[3:5]
    out = {r.index: r for r in vllm_engine.generate(other + plain)}
    assert all(not out[r.index].ok and "rendered for a vLLM engine with other arguments" in out[r.index].error
               for r in other)
    assert all(out[r.index].ok for r in plain)


def test_transformers_gets_rendered_requests_prepared_again(tiny_card, photo_set):
    """vLLM fell back to transformers after the workers had rendered: each such request is prepared
    again here, images and all, and answered as if never rendered."""
    from vlm_batch.engines.hf import HFEngine

    engine = HFEngine(tiny_card)
    try:
        with Preparer(tiny_card, {photo_set.dataset_name: photo_set}, 2, rendering=rendering(tiny_card, {})) as pre:
            failures: list = []
            rendered = list(pre.requests(failures, rows_of(photo_set)))
            assert all(r.rendered and not r.images for r in rendered)
            got = {r.index: r.prediction for r in answered(tiny_card, EngineStart.running(engine), rendered,
                                                           failures=failures, unrendered=pre.unrendered)}
        expected = {r.index: r.prediction for r in engine.generate(prepared(tiny_card, photo_set, 0))}
    finally:
        engine.close()
    assert got == expected and len(got) == N


def test_no_worker_or_the_image_cache_keeps_rendering_in_the_engine(tiny_card, photo_set):
    render = rendering(tiny_card, {})
    assert render is not None
    with Preparer(tiny_card, {photo_set.dataset_name: photo_set}, 0, rendering=render) as none:
        assert none.workers == 0 and none.rendering is None
    with Preparer(tiny_card, {photo_set.dataset_name: photo_set}, 1, rendering=render) as one:
        assert one.workers == 1 and one.rendering is render
    assert rendering(tiny_card, {"mm_processor_cache_gb": 4}) is None   # the cache mirrors one renderer


def test_rendering_raises_the_open_file_limit_or_stays_in_the_engine(tmp_path):
    check = "from vlm_batch.engines.rendering import room_for_descriptors as r; import resource; " \
            "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    out = {}
    for limits in ("-S -n 1024", "-n 1024"):   # the soft limit alone, or the hard one too
        proc = subprocess.run(["bash", "-c", f"ulimit {limits} && {sys.executable} -c '{check}'"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[limits] = proc.stdout.split()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 4096:
        assert out["-S -n 1024"] == ["True", str(min(65535, hard) if hard != resource.RLIM_INFINITY else 65535)]
    assert out["-n 1024"] == ["False", "1024"]


def test_a_worker_that_cannot_render_leaves_the_request_whole(tiny_card, photo_set):
    request = prepared(tiny_card, photo_set, 0)[0]
    broken = Rendering({**engine_args(tiny_card), "model": "/no/such/checkpoint"})
    assert broken(request) is False and broken.broken
    assert request.rendered is None and len(request.images) == 1


def test_fallback_stops_the_workers_rendering(tiny_card, photo_set):
    engine_is_vllm = [True]
    render = rendering(tiny_card, {}, wanted=lambda: engine_is_vllm[0])
    with Preparer(tiny_card, {photo_set.dataset_name: photo_set}, 2, rendering=render) as pre:
        assert all(r.rendered for r in pre.requests([], rows_of(photo_set)))
        engine_is_vllm[0] = False
        again = list(pre(rows_of(photo_set)))
    assert all(not isinstance(r, Result) and r.rendered is None and r.images for r in again)


def test_the_workers_key_is_the_engines_for_every_option_it_takes():
    """`rendering` drops the engine's own options by name; one it forgot would change the workers' key
    and fail every rendered request, so the list is checked against the signatures."""
    import inspect

    from vlm_batch.engines import HF_ONLY
    from vlm_batch.engines.vllm import OWN_OPTIONS, VLLMEngine

    def named(fn):
        return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    assert set(OWN_OPTIONS) == named(VLLMEngine.__init__) - named(engine_args)
    assert not set(OWN_OPTIONS) & set(HF_ONLY)
