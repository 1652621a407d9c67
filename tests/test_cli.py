"""The command line: help stays light, names are checked, errors are one line."""

import os
import subprocess
import sys

from click.testing import CliRunner

from vlm_batch.cli import cli

HEAVY = ("torch", "vllm", "vlmeval", "transformers")


def test_help_and_import_load_no_heavy_library():
    code = (
        "import sys; import vlm_batch; from vlm_batch.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "for sub in ('eval', 'models', 'plugins'):\n"
        "    try:\n        cli([sub, '--help'])\n    except SystemExit:\n        pass\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: " in out and "--batch-size" in out
    assert "LOADED []" in out, out[-300:]


def test_models_lists_every_name_with_plugin_and_engines():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    for name in ("Qwen2-VL-2B-Instruct", "Qwen2-VL-7B-Instruct", "Qwen2-VL-72B-Instruct", "tiny-qwen2-vl"):
        assert "qwen2_vl" in lines[name] and "engines: vllm, hf" in lines[name]
    assert "(demo)" in lines["tiny-qwen2-vl"]


def test_plugins_lists_versions_and_hooks():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    qwen = next(line for line in result.output.splitlines() if line.startswith("qwen2_vl "))
    assert "vlm-batch-qwen2-vl 0.1.0" in qwen and "vlm_batch_prepare" in qwen and "vlm_batch_models" in qwen


def test_unknown_model_is_one_line_naming_what_exists():
    result = CliRunner().invoke(cli, ["eval", "--model", "no-such-model"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "Unknown model 'no-such-model'" in lines[0] and "tiny-qwen2-vl" in lines[0]


def test_unknown_dataset_is_one_line_naming_what_exists():
    result = CliRunner().invoke(cli, ["eval", "--dataset", "NoSuchBench", "--mode", "eval"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "Unknown dataset 'NoSuchBench'" in last and "MMBench_DEV_EN" in last and "NoSuchBench.tsv" in last


def test_plugin_env_var_limits_what_loads():
    env = dict(os.environ, VLM_BATCH_PLUGINS="")
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "models"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "No models" in out
    env["VLM_BATCH_PLUGINS"] = "qwen2_vl"
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "models"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "tiny-qwen2-vl" in out
