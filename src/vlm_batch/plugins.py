"""The plugin manager: entry-point group `vlm_batch`, plus the core's default hook implementations.

A card remembers the plugin that serves it, and the core calls that plugin's hooks for it (`hooks`):
plugins never filter by family. A plugin that serves no models (one that traces or paces requests,
say) is called for every model. `VLM_BATCH_PLUGINS` limits which installed plugins load: a
comma-separated list of entry-point names, or an empty string for none. Tests register plugins
in-process with `pm.register`.
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


class UnknownModel(LookupError):
    pass


def get_models() -> dict:
    """Every ModelCard of every loaded plugin, by name: the cards plugins list, then one for each
    VLMEvalKit registry entry of a class a plugin serves (`served`); the first to claim a name keeps
    it. A card may name the plugin that serves it (the tests' tiny models do); it is left out when
    that plugin is not loaded."""
    from .served import registry

    load_plugins()
    cards = {}
    for impl in reversed(pm.hook.vlm_batch_models.get_hookimpls()):
        for card in impl.function() or ():
            card = card if card.plugin else card.with_plugin(plugin_name(impl.plugin))
            if pm.get_plugin(card.plugin) is not None:
                cards.setdefault(card.name, card)
    for card in registry()[0]:
        cards.setdefault(card.name, card)
    return cards


def get_unserved() -> list:
    """The registry entries of served classes that their plugin cannot run, each with its reason."""
    from .served import registry

    cards = get_models()
    return [u for u in registry()[1] if u.name not in cards]


class CardHooks:
    """The hooks as one card's plugin answers them, the core's defaults behind it; plugins that serve
    other models are left out (pluggy calls a subset), plugins that serve none stay in."""

    def __init__(self, card):
        owner = pm.get_plugin(card.plugin)
        if owner is None:
            raise UnknownModel(f"model '{card.name}' is served by the plugin '{card.plugin}', which is not loaded")
        serving = {impl.plugin for hook in (pm.hook.vlm_batch_models, pm.hook.vlm_batch_vlmeval_card)
                   for impl in hook.get_hookimpls()}   # a plugin may serve only VLMEvalKit's names
        others = [p for p in serving if p is not owner]
        self.card = card
        self._prepare = pm.subset_hook_caller("vlm_batch_prepare", others)
        self._generate = pm.subset_hook_caller("vlm_batch_generate", others)
        self._estimate = pm.subset_hook_caller("vlm_batch_estimate_memory", others)

    def prepare(self, message, dataset):
        return self._prepare(card=self.card, message=message, dataset=dataset)

    def generate(self, engine, requests):
        return self._generate(card=self.card, engine=engine, requests=requests)

    def estimate_memory(self, request):
        return self._estimate(card=self.card, request=request)


def hooks(card) -> CardHooks:
    load_plugins()
    return CardHooks(card)


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
