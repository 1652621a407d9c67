"""Installs as published: the distributions built by tools/build_dists.py (as `nox -s dist` does),
installed with pip from those files alone into fresh venvs, one extra each, then run there.

A fresh venv reuses the test venv's heavy packages (torch, transformers, vLLM, VLMEvalKit) through
a folder of symlinks to its site-packages, minus vlm-batch's own editable installs: were those
visible, pip would find vlm-batch already installed and every plugin's entry point would load.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The wheels and sdists, built once for the module by the same script as `nox -s dist`."""
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, ROOT / "tools" / "build_dists.py", out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def shared_packages(tmp_path_factory):
    """Symlinks to every entry of this venv's site-packages except vlm-batch and its plugins (their
    packages, dist-infos and editable finders) and .pth files (editable installs add paths by them)."""
    hidden = {"vlm_batch", "vlm-batch", "__editable__"}
    for ep in importlib.metadata.entry_points(group="vlm_batch"):
        hidden |= {ep.module.split(".")[0].lower(), ep.dist.name.lower().replace("-", "_")}
    farm = tmp_path_factory.mktemp("shared-site-packages")
    for site in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}:
        for entry in Path(site).iterdir():
            name = entry.name.lower()
            if name.startswith(tuple(hidden)) or name.endswith((".pth", ".egg-link")):
                continue
            if not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return farm


def _env(tmp: Path) -> dict:
    """Offline, no plugin filter, no pip configuration or extra wheel folders of this machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLM_BATCH_PLUGINS", "PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    (tmp / "LMUData").mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LMUData=str(tmp / "LMUData"),
               VLM_BATCH_HOME=str(tmp / "home"), PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1")
    return env


PROBE = r"""
import importlib.metadata as md, importlib.util, json, sysconfig
eps = md.entry_points(group="vlm_batch")
out = {"site": sysconfig.get_path("purelib"), "eps": sorted(ep.name for ep in eps),
       "dists": sorted({d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].startswith("vlm-batch")})}
if importlib.util.find_spec("vlm_batch"):
    import vlm_batch
    out["vlm_batch"] = vlm_batch.__file__
    from vlm_batch.plugins import get_models, get_unserved
    cards = get_models()   # the plugins' own cards and those of VLMEvalKit's names they serve
    out["declared"] = sorted([*cards, *(u.name for u in get_unserved())])
    out["demo"] = [str(c.path()) for c in cards.values() if c.demo]
print(json.dumps(out))
"""


def _probe(python: Path, env: dict, cwd: Path) -> dict:
    proc = _run([python, "-c", PROBE], env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen3-vl", "molmo"])
def venv(request, dists, shared_packages, tmp_path_factory):
    """A fresh venv with `vlm-batch[<extra>]` installed from the built files only: no index, no network."""
    extra = request.param
    tmp = tmp_path_factory.mktemp(f"venv-{extra}")
    env, root = _env(tmp), tmp / "venv"
    # No pip of its own: the shared folder's pip runs in it (and installs into it), saving ensurepip.
    _run([sys.executable, "-m", "venv", "--without-pip", root]).check_returncode()
    python = root / "bin" / "python"
    site = Path(_probe(python, env, tmp)["site"])
    (site / "shared_test_packages.pth").write_text(f"{shared_packages}\n")
    before = _probe(python, env, tmp)
    assert "vlm_batch" not in before and before["eps"] == [] and before["dists"] == [], before
    report = tmp / "pip-report.json"
    proc = _run([python, "-m", "pip", "install", "--no-index", "--find-links", dists, "--report", report,
                 f"vlm-batch[{extra}]"], env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"extra": extra, "python": python, "bin": root / "bin", "env": env, "tmp": tmp,
            "report": json.loads(report.read_text()), "probe": _probe(python, env, tmp), "dists": dists}


def test_pip_installs_the_core_and_one_plugin_from_the_wheels(venv):
    """Everything else (torch, transformers, VLMEvalKit, ...) is already there and reused."""
    plugin = f"vlm-batch-{venv['extra']}"
    installed = {i["metadata"]["name"]: i["download_info"]["url"] for i in venv["report"]["install"]}
    assert sorted(installed) == ["vlm-batch", plugin]
    for url in installed.values():
        assert url.startswith(venv["dists"].as_uri()) and url.endswith(".whl"), url
    probe = venv["probe"]
    assert probe["dists"] == ["vlm-batch", plugin]
    assert probe["eps"] == [venv["extra"].replace("-", "_")]
    assert Path(probe["vlm_batch"]).is_relative_to(probe["site"]), probe["vlm_batch"]
    assert not Path(probe["vlm_batch"]).resolve().is_relative_to(ROOT)
    # VLMEvalKit's registry snapshot ships as package data: names are checked without importing VLMEvalKit.
    assert (Path(probe["vlm_batch"]).parent / "vlmeval" / "supported_vlm.json").is_file()
    # The embedded model is the wheel's package data, not the source tree's folder.
    assert all(Path(p).is_relative_to(probe["site"]) for p in probe["demo"]), probe["demo"]
    assert len(probe["demo"]) == (venv["extra"] == "qwen2-vl")


def test_models_lists_exactly_the_plugins_models(venv):
    cli = venv["bin"] / "vlm-batch"
    help_text = _run([cli, "models", "--help"], env=venv["env"], cwd=venv["tmp"]).stdout
    cmd = [cli, "models", "--all"] if "--all" in help_text else [cli, "models"]
    proc = _run(cmd, env=venv["env"], cwd=venv["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    listed = sorted(n for n in names if not n.endswith(":"))   # a family's heading ends its first word so
    assert listed and listed == venv["probe"]["declared"]


def test_eval_without_a_model(venv):
    """qwen2-vl ships the trained demo model: it scores on the sample set through transformers;
    molmo ships none: a one-line error, status 2."""
    work = venv["tmp"] / "outputs"
    args = ["--engine", "hf", "--work-dir", work] if venv["extra"] == "qwen2-vl" else []
    proc = _run([venv["bin"] / "vlm-batch", "eval", *args], env=venv["env"], cwd=venv["tmp"])
    if not args:
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()   # the error alone: no traceback, no log noise
        assert len(lines) == 1 and lines[0].lower().startswith("error: no embedded demo model"), proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    rows = len(pd.read_csv(venv["tmp"] / "LMUData" / "VLMBatchShapes.tsv", sep="\t"))
    assert rows == 160 and f"items {rows}: generated {rows}, resumed 0, failed 0" in proc.stdout
    assert len(pd.read_excel(work / "tiny-qwen2-vl" / "tiny-qwen2-vl_VLMBatchShapes.xlsx")) == rows
    acc = pd.read_csv(work / "tiny-qwen2-vl" / "tiny-qwen2-vl_VLMBatchShapes_acc.csv")
    assert "score:" in proc.stdout and acc["Overall"][0] >= 0.9
