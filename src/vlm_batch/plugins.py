"""The plugin manager: entry-point group `vlm_batch`, plus the core's default hook implementations.

`VLM_BATCH_PLUGINS` limits which installed plugins load: a comma-separated list of entry-point
names, or an empty string for none. Tests register plugins in-process with `pm.register`.
"""

from __future__ import annotations

import importlib.metadata
import os

import pluggy

from . import hookspecs

pm = pluggy.PluginManager("vlm_batch")
pm.add_hookspecs(hookspecs.BatchCapableModel)
pm.register(importlib.import_module("vlm_batch.defaults"), name="vlm_batch.defaults")

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Load installed plugins once; the env var, when set, names the only ones allowed."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    allowed = os.environ.get("VLM_BATCH_PLUGINS")
    if allowed is None:
        pm.load_setuptools_entrypoints("vlm_batch")
        return pm
    names = {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group="vlm_batch"):
        if ep.name in names and not pm.has_plugin(ep.name):
            pm.register(ep.load(), name=ep.name)
    return pm


def plugin_name(plugin) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def get_models() -> dict:
    """Every ModelCard of every loaded plugin, by name; the first plugin to claim a name keeps it."""
    load_plugins()
    cards = {}
    for impl in reversed(pm.hook.vlm_batch_models.get_hookimpls()):
        for card in impl.function() or ():
            cards.setdefault(card.name, card.with_plugin(plugin_name(impl.plugin)))
    return cards


class UnknownModel(LookupError):
    pass


def get_model(name: str):
    cards = get_models()
    if name not in cards:
        known = ", ".join(sorted(cards)) or "none (install a model plugin; see the README)"
        raise UnknownModel(f"Unknown model '{name}'. Available: {known}")
    return cards[name]


def get_plugins() -> list[dict]:
    """Installed plugins with their versions and the hooks each implements."""
    load_plugins()
    dists = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == "vlm_batch":
                dists[ep.name] = (dist.metadata["Name"], dist.version)
    out = []
    for plugin in pm.get_plugins():
        name = plugin_name(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        dist, version = dists.get(name, ("vlm-batch" if name.startswith("vlm_batch.") else None, None))
        if version is None and dist == "vlm-batch":
            from . import __version__ as version
        out.append({"name": name, "distribution": dist, "version": version, "hooks": hooks})
    return sorted(out, key=lambda p: p["name"])
