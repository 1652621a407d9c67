"""VLMEvalKit models the installed plugins serve, as cards, by the VLMEvalKit class each plugin names.

A family plugin states two facts: `VLMEVAL_CLASSES`, the VLMEvalKit model classes it serves, and
`ARCHITECTURES`, the checkpoint architectures (config.json `architectures`) it runs, each with the
class whose prompts it takes. From them the core makes cards, always through the plugin's
`vlm_batch_vlmeval_card(entry)` hook, which applies the class's arguments as that class does:
- every `supported_VLM` entry of a served class (read from the registry's snapshot: no seconds-long
  import), or the reason the plugin cannot run it (`vlm-batch models --all`);
- a user's config entry naming a class, its `model_path` and that class's arguments;
- a checkpoint folder or hub id given as the model, by the architecture its config.json names.
Bad input is one line naming what is served, raised before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace

from .models import ModelCard, Unserved
from .plugins import load_plugins, plugin_name, pm
from .vlmeval.registry import Entry, entries

log = logging.getLogger(__name__)
HOOK = "vlm_batch_vlmeval_card"


class ServeError(ValueError):
    """A model the plugins cannot serve: an unknown class, architecture or checkpoint folder."""


def _plugins_stating(fact: str) -> list:
    load_plugins()
    return [p for p in pm.get_plugins() if getattr(p, fact, None)]


def class_servers() -> dict[str, object]:
    """VLMEvalKit class name -> the plugin serving it (the first plugin to name a class keeps it)."""
    out: dict = {}
    for plugin in _plugins_stating("VLMEVAL_CLASSES"):
        for cls in plugin.VLMEVAL_CLASSES:
            out.setdefault(cls, plugin)
    return out


def architecture_servers() -> dict[str, tuple[object, str]]:
    """Checkpoint architecture -> (the plugin running it, the VLMEvalKit class whose prompts it takes)."""
    out: dict = {}
    for plugin in _plugins_stating("ARCHITECTURES"):
        for arch, cls in plugin.ARCHITECTURES.items():
            out.setdefault(arch, (plugin, cls))
    return out


def tensor_parallel(name: str) -> dict:
    """vLLM's GPUs for a model by the parameter count in its name (VLMEvalKit's classes take every GPU, up
    to 8): 4 from 60B, 8 from 200B; `--tp` overrides it."""
    sizes = [int(n) for n in re.findall(r"(\d+)B", name)]
    size = max(sizes) if sizes else 0
    return {"tensor_parallel_size": 8 if size >= 200 else 4} if size >= 60 else {}


def card_for(entry: Entry, plugin) -> ModelCard | Unserved:
    """The plugin's card for an entry of a class it serves, or why it cannot serve it."""
    impls = [i for i in pm.hook.vlm_batch_vlmeval_card.get_hookimpls() if i.plugin is plugin]
    name = plugin_name(plugin)
    if not impls:
        return Unserved(entry.name, f"the plugin '{name}' names the class but makes no cards of it",
                        entry.cls, name)
    out = impls[0].function(entry=entry)
    if isinstance(out, Unserved):
        return replace(out, vlmeval_class=out.vlmeval_class or entry.cls, plugin=out.plugin or name,
                       family=out.family or getattr(plugin, "FAMILY", "") or name)
    if not isinstance(out, ModelCard):
        return Unserved(entry.name, f"the plugin '{name}' returned no card", entry.cls, name)
    return replace(out, vlmeval_class=out.vlmeval_class or entry.cls, plugin=out.plugin or name)


def registry() -> tuple[list[ModelCard], list[Unserved]]:
    """Cards for every registry entry of a served class, and the entries that cannot be served."""
    servers = class_servers()
    if not servers:
        return [], []
    cards, unserved = [], []
    for entry in entries(servers).values():
        out = card_for(entry, servers[entry.cls])
        (unserved if isinstance(out, Unserved) else cards).append(out)
    return cards, unserved


def _served_classes() -> str:
    servers = class_servers()
    return ", ".join(f"{cls} ({plugin_name(p)})" for cls, p in sorted(servers.items())) or \
        "none (install a model plugin; see the README)"


def class_card(name: str, cls: str, kwargs: dict) -> ModelCard:
    """A user's model built as VLMEvalKit's config would: `cls(model_path=..., **kwargs)`."""
    servers = class_servers()
    if cls not in servers:
        raise ServeError(f"model '{name}': no installed plugin serves VLMEvalKit's class '{cls}'; "
                         f"served: {_served_classes()}")
    path = kwargs.get("model_path")
    if not path or not isinstance(path, str):
        raise ServeError(f"model '{name}': a '{cls}' entry needs its checkpoint as 'model_path'")
    found = architectures(path) if os.path.isdir(os.path.expanduser(path)) else []
    out = card_for(Entry(name, cls, kwargs, architecture=found[0] if found else ""), servers[cls])
    if isinstance(out, Unserved):
        raise ServeError(f"model '{name}' ({cls}): {out.reason}")
    return out


def looks_like_checkpoint(name: str) -> bool:
    """A local folder, or a path-like or `org/name` string: a checkpoint rather than a model name."""
    return os.path.isdir(name) or name.startswith(("/", "./", "../", "~")) or name.count("/") == 1


def architectures(path: str) -> list[str]:
    """config.json's `architectures` of a checkpoint folder or hub id, or ServeError saying what is wrong."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        config = os.path.join(local, "config.json")
        if not os.path.isfile(config):
            raise ServeError(f"model '{path}': the folder is not a checkpoint (it has no config.json)")
    elif path.startswith(("/", "./", "../", "~")):
        raise ServeError(f"model '{path}': no such checkpoint folder")
    else:
        try:
            from huggingface_hub import hf_hub_download

            config = hf_hub_download(path, "config.json")
        except Exception as exc:   # offline, no such repo, no access: one line either way
            raise ServeError(f"model '{path}': not a model name, and its config.json could not be read from "
                             f"the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    try:
        with open(config) as fh:
            found = json.load(fh).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ServeError(f"model '{path}': its config.json could not be read ({exc})") from exc
    return list(found)


def checkpoint_card(path: str) -> ModelCard:
    """A checkpoint given as the model: the plugin running its architecture, with the prompts of the
    VLMEvalKit class it names for that architecture (and that class's default arguments)."""
    found = architectures(path)
    servers = architecture_servers()
    for arch in found:
        if arch in servers:
            plugin, cls = servers[arch]
            break
    else:
        served = ", ".join(f"{a} ({plugin_name(p)})" for a, (p, _) in sorted(servers.items())) or "none"
        raise ServeError(f"model '{path}': its architecture {', '.join(found) or '(none named)'} is served by no "
                         f"installed plugin; served: {served}")
    local = os.path.expanduser(path)
    name = os.path.basename(os.path.normpath(local)) or path
    out = card_for(Entry(name, cls, {"model_path": local if os.path.isdir(local) else path}, architecture=arch),
                   plugin)
    if isinstance(out, Unserved):
        raise ServeError(f"model '{path}' ({arch}): {out.reason}")
    log.info("%s: a %s checkpoint, served by the plugin '%s' with VLMEvalKit's %s prompts", path, arch,
             out.plugin, cls)
    return out


def listing(cards: dict, unserved: list) -> list[str]:
    """One block per family: a heading with its counts, then a line per name (the name first)."""
    families: dict = {}
    for card in cards.values():
        families.setdefault(card.family, ([], []))[0].append(card)
    for item in unserved:
        families.setdefault(item.family or item.plugin, ([], []))[1].append(item)
    from .vlmeval.registry import entries

    names = entries()
    width = max(len(n) for n in [*cards, *(u.name for u in unserved)])
    blocks = []
    for family in sorted(families, key=str.lower):
        served, cannot = families[family]
        registered = [c for c in served if c.name in names]
        classes = sorted({c.vlmeval_class for c in [*registered, *cannot] if c.vlmeval_class})
        plugins = sorted({c.plugin for c in served} | {u.plugin for u in cannot})
        head = f"{family}: {len(served)} model{'s' if len(served) != 1 else ''} (plugin {', '.join(plugins)}"
        if classes:
            total = sum(1 for e in names.values() if e.cls in classes)
            head += f"; {len(registered)} of the {total} names of VLMEvalKit's {', '.join(classes)}"
        head += ")"
        lines = [head]
        for card in sorted(served, key=lambda c: c.name.lower()):
            extra = " (demo)" if card.demo else ""
            note = f"  [{card.description}]" if card.vlmeval_class and card.description else ""
            lines.append(f"{card.name:<{width}}  {card.plugin}  engines: {', '.join(card.engines)}{extra}{note}")
        for item in sorted(cannot, key=lambda u: u.name.lower()):
            lines.append(f"{item.name:<{width}}  {item.plugin}  not served: {item.reason}")
        blocks.append("\n".join(lines))
    return blocks
