"""The suite plan: models x datasets, from the command line or a VLMEvalKit-style `--config` JSON.

Every name is checked before any model loads; a bad plan fails with one line naming every bad name
and what is available.

The config is VLMEvalKit's format:

    {"model": {"some-model": {"max_new_tokens": 8},
               "short-answers": {"model": "some-model", "max_new_tokens": 4}},
     "data": {"VLMBatchShapes": {},
              "MyYesNo": {"class": "ImageYORNDataset", "dataset": "MyYesNo"}}}

A `model` entry names a vlm-batch model (its key, or its `model` field; the key names the output
folder) and may override its generation and engine settings. Or, as in VLMEvalKit's config, it builds
one: `{"my-ft": {"class": "SomeVLMEvalKitChat", "model_path": "/ckpt", ...}}` runs the checkpoint
through the plugin serving that class, with the class's prompts and those arguments. A model named
by a checkpoint folder or hub id (`--model PATH`) is served by the plugin that runs the architecture
its config.json names. A `data` entry is a dataset name, with VLMEvalKit's `class` making a local TSV
a dataset of that class.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .models import ModelCard

MODEL_KEYS = {
    "model": "the vlm-batch model this entry runs (default: the entry's own name)",
    "max_new_tokens": "longest answer, in tokens",
    "max_model_len": "the engine's context length (vLLM's max_model_len)",
    "batch_size": "sequences the engine runs at once",
    "engine": "auto, vllm or hf",
    "generation": "sampling settings both engines take (an object)",
    "vllm_args": "more vLLM engine arguments (an object)",
}
CLASS_KEYS = {"class": "a VLMEvalKit model class a plugin serves; the entry's other keys are its arguments",
              "model_path": "the checkpoint (folder or hub id) of a `class` entry"}


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str | None = None          # mcq | yorn | vqa, or a VLMEvalKit dataset class name


@dataclass
class ModelSpec:
    card: ModelCard
    engine: Any = "auto"                          # asked for: auto | vllm | hf, or an engine already running
    options: dict = field(default_factory=dict)   # engine options beyond the command line's
    choice: Any = None                            # engines.choice.Choice, decided by `Plan.decide_engines`

    @property
    def running(self) -> bool:
        """The caller runs the engine (and closes it): a library call with a started engine."""
        return not isinstance(self.engine, str)


@dataclass
class Plan:
    models: list[ModelSpec]
    datasets: list[DatasetSpec]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def decide_engines(self, options: dict) -> None:
        """Each model's engine, decided before any model loads (`options`: the run's engine options);
        every problem in one PlanError."""
        from .engines import EngineError
        from .engines.choice import decide

        problems = []
        for spec in self.models:
            if spec.running or spec.choice is not None:
                continue
            opts = {**options, **spec.options}
            try:
                if opts.get("tensor_parallel_size", 1) > 1 and spec.engine == "hf":
                    raise PlanError(f"--tp {opts['tensor_parallel_size']} splits one model across GPUs, which "
                                    "only the vllm engine does; the hf engine runs one model per GPU (use more "
                                    "ranks or replicas)")
                spec.choice = decide(spec.card, spec.engine, opts.get("trust_remote_code", False))
            except (EngineError, PlanError) as exc:
                problems.append(str(exc))
        if problems:
            raise PlanError("; ".join(problems))


def build(settings) -> Plan:
    """The plan a run's settings name: a config, or model and dataset names (the demo by default)."""
    from .demo import demo_card
    from .demo.sample_data import SETS
    from .plugins import get_models

    if settings.config:
        if settings.models or settings.datasets:
            raise PlanError("--config names the models and datasets; leave out --model and --dataset")
        return from_config(settings.config, engine=settings.engine)
    return from_names(list(settings.models), list(settings.datasets) or list(SETS), engine=settings.engine,
                      kind=settings.kind, demo=demo_card(get_models()))


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def from_names(models: list[str], datasets: list[str], *, engine: str, kind: str | None = None,
               demo=None) -> Plan:
    """`--model M [M ...] --dataset D [D ...]`; no model: the embedded demo model."""
    from .plugins import get_models

    cards = get_models()
    resolved, problems = _resolve(_unique(models), cards)
    if problems:   # before the datasets' check, which imports VLMEvalKit: a name check takes no seconds
        raise PlanError("; ".join(problems))
    if not models:
        if demo is None:
            problems.append("no embedded demo model is installed; pass --model (see `vlm-batch models`) "
                            "or install a model plugin that ships one (see the README)")
        else:
            models, resolved[demo.name] = [demo.name], demo
    specs = [DatasetSpec(d, kind) for d in _unique(datasets)]
    problems += _dataset_problems(specs)
    if problems:
        raise PlanError("; ".join(problems))
    return Plan([ModelSpec(resolved[m], engine) for m in _unique(models)], specs)


def _resolve(models: list[str], cards: dict) -> tuple[dict, list[str]]:
    """Each model name's card: a served name, or a checkpoint folder or hub id served by its architecture."""
    from .served import ServeError, checkpoint_card, looks_like_checkpoint

    resolved, bad, problems = {}, [], []
    for name in models:
        if name in cards:
            resolved[name] = cards[name]
        elif looks_like_checkpoint(name):
            try:
                resolved[name] = checkpoint_card(name)
            except ServeError as exc:
                problems.append(str(exc))
        else:
            bad.append(name)
    if bad:
        problems.insert(0, _unknown_models(bad, cards))
    return resolved, problems


def from_config(path: str, *, engine: str) -> Plan:
    from .plugins import get_models
    from .served import ServeError

    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise PlanError(f"could not read the config {path}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(
            config.get("data"), dict):
        raise PlanError(f"{path}: a config is an object with a 'model' and a 'data' object, as VLMEvalKit's")
    cards = get_models()
    problems, models, bad = [], [], []
    for key, entry in config["model"].items():
        entry = entry if isinstance(entry, dict) else {}
        if "class" in entry:
            try:
                models.append(_class_entry(key, entry, engine))
            except ServeError as exc:
                problems.append(str(exc))
            continue
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            problems.append(f"model '{key}': unknown setting(s) {', '.join(unknown)} (settings: "
                            f"{', '.join(MODEL_KEYS)}; or build a model from VLMEvalKit's 'class' and 'model_path')")
            continue
        base = entry.get("model", key)
        found, trouble = _resolve([base], cards)
        if base in found:
            models.append(_override(found[base], key, entry, engine))
        elif base in cards or not trouble[0].startswith("Unknown model"):
            problems += trouble
        else:
            bad.append(base)
    if bad:
        problems.insert(0, _unknown_models(bad, cards))
    specs = []
    for key, entry in config["data"].items():
        entry = entry if isinstance(entry, dict) else {}
        name = entry.get("dataset", key)
        if name != key:
            problems.append(f"data '{key}': its 'dataset' is '{name}'; use the dataset's name as the key")
            continue
        specs.append(DatasetSpec(name, entry.get("class")))
    problems += _dataset_problems(specs)
    if not models or not specs:
        problems.append(f"{path}: the config names no {'model' if not models else 'dataset'}")
    if problems:
        raise PlanError("; ".join(problems))
    return Plan(models, specs)


def _class_entry(key: str, entry: dict, engine: str) -> ModelSpec:
    """VLMEvalKit's `{"class": C, "model_path": P, **arguments}`: the card of the plugin serving C, with
    vlm-batch's own settings of the entry applied on top (max_new_tokens is both)."""
    from .served import ServeError, class_card

    cls = entry["class"]
    if not isinstance(cls, str):
        raise ServeError(f"model '{key}': 'class' names a VLMEvalKit model class (see `vlm-batch models`)")
    ours = {k: entry[k] for k in MODEL_KEYS if k in entry and k != "model"}
    args = {k: v for k, v in entry.items() if k not in CLASS_KEYS and (k not in MODEL_KEYS or k == "max_new_tokens")}
    card = class_card(key, cls, {"model_path": entry.get("model_path"), **args})
    return _override(card, key, ours, engine)


def _override(card: ModelCard, name: str, entry: dict, engine: str) -> ModelSpec:
    changes: dict = {"name": name, "vlmeval_name": card.prompt_name}
    if "max_new_tokens" in entry:
        changes["max_new_tokens"] = int(entry["max_new_tokens"])
    vllm_args = dict(card.vllm_args, **entry.get("vllm_args", {}))
    if "max_model_len" in entry:
        vllm_args["max_model_len"] = int(entry["max_model_len"])
    changes["vllm_args"] = vllm_args
    if "generation" in entry:
        changes["generation"] = dict(card.generation, **entry["generation"])
    if name != card.name:
        changes["demo"] = False
    options = {"batch_size": int(entry["batch_size"])} if "batch_size" in entry else {}
    return ModelSpec(dataclasses.replace(card, **changes), entry.get("engine", engine), options)


def _unknown_models(bad: list[str], cards: dict) -> str:
    import difflib

    known = ", ".join(sorted(cards, key=str.lower)) or "none (install a model plugin; see the README)"
    names = ", ".join(f"'{b}'" for b in bad)
    close = sorted({m for b in bad for m in difflib.get_close_matches(b, list(cards), n=3, cutoff=0.6)})
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"Unknown model{'s' if len(bad) > 1 else ''} {names} (not a model name, checkpoint folder or hub id)."
            f"{hint} Available: {known}")


def _dataset_problems(specs: list[DatasetSpec]) -> list[str]:
    from .vlmeval import DatasetError
    from .vlmeval.datasets import UnknownDataset, check_dataset, unknown_datasets_message

    problems, unknown = [], []
    for spec in specs:
        try:
            check_dataset(spec.name, spec.kind)
        except UnknownDataset:
            unknown.append(spec.name)
        except DatasetError as exc:
            problems.append(str(exc))
    if unknown:
        problems.insert(0, unknown_datasets_message(unknown))
    return problems
