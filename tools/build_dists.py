"""Build the wheels and sdists of every distribution (the core and plugins/*) and check them.

One build path for `nox -s dist` and tests/test_install.py, so what the test installs is what
would be published. Usage: `python tools/build_dists.py [OUT]` (default dist/); needs `build`,
`twine` and setuptools>=77 in the running interpreter (it builds with --no-isolation: no index).

Each distribution is built from a fresh copy of its files as git sees them (tracked, plus
untracked but not ignored), so stale egg-info or build/ folders of editable installs cannot leak
into an archive and nothing is written into the working tree. `python -m build` makes the wheel
from the sdist, so a file the sdist lacks is missing from the wheel too and the checks see it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The trained embedded demo model, package data of the qwen2-vl plugin (about 5 MB).
TINY_PLUGIN, TINY_DIR = "vlm-batch-qwen2-vl", "vlm_batch_qwen2_vl/tiny"


def sources() -> dict[str, list[str]]:
    """Each distribution's folder (relative to ROOT) -> its files, relative to that folder."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]   # -c lists deleted files too
    plugins = sorted(p.parent.name for p in ROOT.glob("plugins/*/pyproject.toml"))
    dists = {"": [f for f in files if not f.startswith("plugins/")]}
    for name in plugins:
        prefix = f"plugins/{name}/"
        dists[prefix] = [f[len(prefix):] for f in files if f.startswith(prefix)]
    return dists


def check_tiny(wheel: Path, source: Path) -> None:
    """The wheel must carry every file of the embedded model, byte for byte the size of the source."""
    want = {f"{TINY_DIR}/{p.name}": p.stat().st_size for p in (source / "src" / TINY_DIR).iterdir()}
    with zipfile.ZipFile(wheel) as zf:
        have = {i.filename: i.file_size for i in zf.infolist() if i.filename.startswith(TINY_DIR + "/")}
    if not want or have != want:
        raise SystemExit(f"{wheel.name}: the embedded model's files differ from the source: "
                         f"missing {sorted(set(want) - set(have))}, extra {sorted(set(have) - set(want))}, "
                         f"other sizes {sorted(k for k in want.keys() & have.keys() if want[k] != have[k])}")


def build_all(out: Path) -> list[Path]:
    """Build every distribution into `out` (replacing earlier builds there), check, return the files."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("vlm_batch*.whl"), *out.glob("vlm_batch*.tar.gz")]:
        old.unlink()
    built = []
    with tempfile.TemporaryDirectory(prefix="vlm-batch-build-") as tmp:
        for folder, files in sources().items():
            src = Path(tmp) / (folder or "core")
            for f in files:
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / folder / f, src / f)
            dest = Path(tmp) / "out" / src.name
            subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dest), str(src)],
                           check=True, stdout=subprocess.DEVNULL)
            made = sorted(dest.iterdir(), key=lambda p: p.suffix)
            if [p.suffix for p in made] != [".gz", ".whl"]:
                raise SystemExit(f"{src.name}: expected one sdist and one wheel, got {[p.name for p in made]}")
            if src.name == TINY_PLUGIN:
                check_tiny(next(p for p in made if p.suffix == ".whl"), src)
            for p in made:
                built.append(Path(shutil.move(p, out / p.name)))
    subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, built)], check=True)
    return built


if __name__ == "__main__":
    for path in build_all(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dist"):
        print(path)
