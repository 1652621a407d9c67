"""`--engine auto`: vLLM where it runs the model, transformers otherwise, and the report says why;
an explicit `--engine vllm` never falls back."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from vlm_batch import ModelCard
from vlm_batch.cli import cli
from vlm_batch.engines import NO_VLLM, EngineError
from vlm_batch.engines.choice import Choice, choose, decide

LIMIT = 24
# Makes `import vllm` fail in a subprocess, as on a machine without it.
NO_VLLM_SITE = "import sys\nsys.modules['vllm'] = None\n"


def card(engines=("vllm", "hf")):
    return ModelCard(name="m", family="f", checkpoint="/nowhere", engines=engines)


def test_choose_names_the_reason(monkeypatch):
    import vlm_batch.engines.choice as choice

    monkeypatch.setattr(choice, "vllm_installed", lambda: True)
    assert choose(card(), "auto") == Choice("vllm", "auto")
    assert choose(card(), "hf") == Choice("hf", "hf")
    assert choose(card(("hf",)), "auto") == Choice("hf", "auto", "m has no vLLM path")
    monkeypatch.setattr(choice, "vllm_installed", lambda: False)
    assert choose(card(), "auto") == Choice("hf", "auto", NO_VLLM)
    assert decide(card(), "auto") == Choice("hf", "auto", NO_VLLM)
    with pytest.raises(EngineError, match="vLLM is not installed"):
        decide(card(), "vllm")


def predictions(work_dir, model="tiny-qwen2-vl", dataset="VLMBatchShapes") -> dict:
    data = pd.read_excel(work_dir / model / f"{model}_{dataset}.xlsx")
    return dict(zip(data["index"], data["prediction"].astype(str)))


def run_report(work_dir, model="tiny-qwen2-vl", dataset="VLMBatchShapes") -> dict:
    return json.loads((work_dir / model / f"{model}_{dataset}_run.json").read_text())


@pytest.mark.engine
def test_auto_falls_back_when_vllm_rejects_the_start(tmp_path):
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({"model": {"tiny-qwen2-vl": {"vllm_args": {"no_such_engine_argument": 1}}},
                                  "data": {"VLMBatchShapes": {}}}))
    auto = CliRunner().invoke(cli, ["eval", "--config", str(config), "--limit", str(LIMIT),
                                    "--work-dir", str(tmp_path / "auto")])
    assert auto.exit_code == 0, auto.output
    assert "engine hf (vLLM's start failed: TypeError" in auto.output and "no_such_engine_argument" in auto.output
    engine = run_report(tmp_path / "auto")["engine"]
    assert engine["name"] == "hf" and "no_such_engine_argument" in engine["fallback"]

    hf = CliRunner().invoke(cli, ["eval", "--engine", "hf", "--limit", str(LIMIT), "--work-dir", str(tmp_path / "hf")])
    assert hf.exit_code == 0, hf.output
    assert run_report(tmp_path / "hf")["engine"]["fallback"] is None
    assert predictions(tmp_path / "auto") == predictions(tmp_path / "hf")
    assert len(predictions(tmp_path / "hf")) == LIMIT


@pytest.mark.engine
def test_without_vllm_auto_runs_on_transformers_and_vllm_is_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_VLLM_SITE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "vlm_batch", "eval", "--limit", str(LIMIT), "--work-dir", str(tmp_path / "out")]

    auto = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "engine hf (vLLM is not installed" in auto.stdout
    assert "vLLM is not installed" in auto.stderr   # the one line saying why, as it starts
    assert run_report(tmp_path / "out")["engine"] == {**run_report(tmp_path / "out")["engine"],
                                                       "name": "hf", "fallback": NO_VLLM}
    assert len(predictions(tmp_path / "out")) == LIMIT

    explicit = subprocess.run(cmd + ["--engine", "vllm", "--rerun"], capture_output=True, text=True, env=env,
                              timeout=600)
    assert explicit.returncode == 2
    assert "Traceback" not in explicit.stderr
    lines = explicit.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: vLLM is not installed"), explicit.stderr
