"""The README's plugin example is complete: it is the file in examples/, and installed, it runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vlm-batch-hello"


def test_readme_shows_the_whole_example():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", readme, re.S)
    for name in ("vlm_batch_hello.py", "pyproject.toml"):
        assert (EXAMPLE / name).read_text() in blocks, f"README does not show {name} as it is"


@pytest.mark.engine
def test_example_installs_lists_and_runs(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    models = subprocess.run([sys.executable, "-m", "vlm_batch", "models"], env=env, capture_output=True,
                            text=True, check=True).stdout
    assert re.search(r"^hello-vlm\s+hello\s+engines: vllm, hf$", models, re.M), models
    run = subprocess.run([sys.executable, "-m", "vlm_batch", "eval", "--model", "hello-vlm", "--engine", "hf",
                          "--limit", "8", "--work-dir", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "items 8: generated 8, resumed 0, failed 0" in run.stdout
    assert (tmp_path / "out" / "hello-vlm" / "hello-vlm_VLMBatchShapes.xlsx").exists()
