"""VLMEvalKit's model registry, `supported_VLM`: which class and arguments a model name stands for.

Reading the registry itself means importing `vlmeval.config`, which imports every model wrapper
VLMEvalKit has: 10-20 s. Listing models and checking a name must not wait for that, so the names are
read from a snapshot: every entry's class name and constructor arguments (all of VLMEvalKit's are
`partial(cls, **keywords)` of plain JSON values). The snapshot of the ms-vlmeval version this release
is tested with ships in the package (`supported_vlm.json`, written by `python -m
vlm_batch.vlmeval.registry`; tests/test_registry.py checks it against the live registry). With any
other installed version, it is extracted from the live registry once, on first use (saying so), and
cached under `VLM_BATCH_HOME` by that version.

Why not parse `vlmeval/config.py` with `ast` instead: its entries are built by code (arithmetic,
module constants, dicts merged in order where a later group overrides a name, loops over groups); a
parser would re-implement that and could silently differ on the next release. The snapshot is taken
from the real objects, so it cannot.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).with_name("supported_vlm.json")
DISTRIBUTION = "ms-vlmeval"


@dataclass(frozen=True)
class Entry:
    """One model VLMEvalKit can build: a `supported_VLM` entry, or a user's config entry naming a class."""
    name: str                                   # the model name (the config key for a user's entry)
    cls: str                                    # VLMEvalKit's class name, e.g. as `vlmeval.vlm` exports it
    kwargs: Mapping[str, Any] = field(default_factory=dict)   # its constructor arguments, model_path included
    api: bool = False                           # a `vlmeval.api` class (a remote service, not weights)
    architecture: str = ""                      # config.json's, when the checkpoint is at hand (else unknown)

    @property
    def model_path(self) -> str | None:
        return self.kwargs.get("model_path")

    @property
    def args(self) -> dict:
        """The constructor arguments besides the checkpoint."""
        return {k: v for k, v in self.kwargs.items() if k != "model_path"}


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def extract() -> dict:
    """The live registry as a snapshot (imports `vlmeval.config`: seconds)."""
    from . import quiet_import

    quiet_import()
    import vlmeval.config

    entries = {}
    for name, entry in vlmeval.config.supported_VLM.items():
        func = getattr(entry, "func", entry)
        kwargs = dict(getattr(entry, "keywords", None) or {})
        try:
            json.dumps(kwargs)
        except TypeError:   # not a plain value: kept by name, so the entry is still listed
            kwargs = {k: v if _plain(v) else repr(v) for k, v in kwargs.items()}
        entries[name] = {"class": func.__name__, "kwargs": kwargs,
                         "api": func.__module__.startswith("vlmeval.api")}
    return {"version": installed_version(), "entries": entries}


def _plain(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _cache_file(version: str) -> Path:
    from ..engines.environment import cache_dir

    return cache_dir() / "vlmeval-registry" / f"supported_vlm-{version}.json"


def _read(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def snapshot() -> dict:
    """The snapshot for the installed ms-vlmeval: the shipped one when versions agree, else the cached
    one, else extracted now and cached."""
    version = installed_version()
    shipped = _read(SHIPPED)
    if shipped is not None and (version is None or shipped.get("version") == version):
        return shipped
    cached = _read(_cache_file(version))
    if cached is not None:
        return cached
    log.warning("reading the model registry of %s %s once (about 15 s); it is then cached in %s",
                DISTRIBUTION, version, _cache_file(version).parent)
    data = extract()
    path = _cache_file(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
    os.replace(tmp, path)
    return data


def entries(classes=None) -> dict[str, Entry]:
    """Registry entries by name, in VLMEvalKit's order; only those of `classes` when given."""
    wanted = None if classes is None else set(classes)
    out = {}
    for name, raw in snapshot()["entries"].items():
        if wanted is None or raw["class"] in wanted:
            out[name] = Entry(name, raw["class"], raw["kwargs"], raw.get("api", False))
    return out


def entry(name: str) -> Entry | None:
    return entries().get(name)


def vlmeval_entry(model_name: str):
    """VLMEvalKit's live `supported_VLM` entry for this name: usually a partial of its class and arguments."""
    import vlmeval.config

    return vlmeval.config.supported_VLM.get(model_name)


def class_named(name: str):
    """VLMEvalKit's model class of this name (`vlmeval.vlm` exports them all), without its registry."""
    import vlmeval.vlm

    return getattr(vlmeval.vlm, name, None)


@functools.lru_cache(maxsize=None)
def vlmeval_class(model_name: str):
    """The class VLMEvalKit builds for a registry name (read from the snapshot: no registry import)."""
    found = entry(model_name)
    if found is None or found.api:
        return None
    return class_named(found.cls)


def card_class(card):
    """The VLMEvalKit class whose prompt rules apply to a card: the class it names, else its name's."""
    return class_named(card.vlmeval_class) if card.vlmeval_class else vlmeval_class(card.prompt_name)


def main() -> None:
    """Write the shipped snapshot from the installed VLMEvalKit: `python -m vlm_batch.vlmeval.registry`."""
    data = extract()
    SHIPPED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{SHIPPED}: {len(data['entries'])} entries of {DISTRIBUTION} {data['version']}")


if __name__ == "__main__":
    main()
