"""Everything that touches VLMEvalKit: datasets, the prompt it would send, its files, its scoring.

We call VLMEvalKit's own code rather than restating it, so prompts and files match it by
construction; this module only decides which of its pieces to call, as `infer_data` does.
"""

from __future__ import annotations

import functools
import os
import os.path as osp
import warnings

from . import sample_data

DEFAULT_JUDGE = "exact_matching"


class DatasetError(ValueError):
    pass


def _quiet_import():
    """VLMEvalKit logs an error when it finds no .env file; that is normal for us."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            import vlmeval.dataset  # noqa: F401
        finally:
            logging.disable(previous)


def load_dataset(name: str, limit: int | None = None):
    """VLMEvalKit's dataset object for `name`, offline from `$LMUData/<name>.tsv` when present."""
    if name == sample_data.NAME:
        sample_data.ensure()
    _quiet_import()
    from vlmeval.dataset import SUPPORTED_DATASETS, build_dataset

    tsv = sample_data.lmudata_root() / f"{name}.tsv"
    if name not in SUPPORTED_DATASETS and not tsv.exists():
        examples = ", ".join(["MMBench_DEV_EN", "MME", "AI2D_TEST", "POPE", sample_data.NAME])
        raise DatasetError(
            f"Unknown dataset '{name}': not one of VLMEvalKit's {len(SUPPORTED_DATASETS)} datasets "
            f"(e.g. {examples}) and no file {tsv}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = build_dataset(name)
    except Exception as exc:
        raise DatasetError(f"Could not load dataset '{name}': {type(exc).__name__}: {exc}") from exc
    if dataset is None:
        raise DatasetError(f"Could not load dataset '{name}' from {tsv}: VLMEvalKit rejected the file "
                           "(it needs at least a `question` column)")
    if limit:
        dataset.data = dataset.data.iloc[:limit]
    return dataset


@functools.lru_cache(maxsize=None)
def _vlmeval_class(model_name: str):
    import vlmeval.config

    entry = vlmeval.config.supported_VLM.get(model_name)
    return getattr(entry, "func", entry)


def prompt_model(card, dataset):
    """VLMEvalKit's own model class for this card, with only what its prompt methods read.

    Its constructor would load weights; the prompt methods need just the attributes the plugin
    lists in `card.prompt_attrs` (a parity test checks them against the real constructor).
    """
    cls = _vlmeval_class(card.prompt_name)
    if cls is None:
        return None
    from vlmeval.vlm.base import BaseModel

    model = object.__new__(cls)
    BaseModel.__init__(model)
    model.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in card.prompt_attrs.items()})
    model.set_dump_image(dataset.dump_image)
    return model


def prompt_builder(card, dataset):
    """The message-building function `infer_data` would use for this model and dataset."""
    if getattr(dataset, "force_use_dataset_prompt", False):
        return dataset.build_prompt
    model = prompt_model(card, dataset)
    name = dataset.dataset_name
    with warnings.catch_warnings():   # "custom dataset, treated as MCQ" is expected for local TSVs
        warnings.simplefilter("ignore")
        custom = model is not None and model.use_custom_prompt(name)
    return functools.partial(model.build_prompt, dataset=name) if custom else dataset.build_prompt


def prediction_file(work_dir: str, model_name: str, dataset_name: str) -> str:
    """Where VLMEvalKit's run.py puts predictions: `{work_dir}/{model}/{model}_{dataset}.xlsx`."""
    from vlmeval.smp import get_pred_file_path

    return get_pred_file_path(osp.join(work_dir, model_name), model_name, dataset_name, use_env_format=True)


def write_predictions(dataset, predictions: dict, path: str) -> str:
    """The dataset's columns minus `image`, plus `prediction`, as `infer_data_job` writes them."""
    from vlmeval.smp import dump

    data = dataset.data.copy()
    missing = [i for i in data["index"] if i not in predictions]
    if missing:
        raise KeyError(f"no prediction for items {missing[:10]}")
    data["prediction"] = [str(predictions[i]) for i in data["index"]]
    if "image" in data:
        data.pop("image")
    os.makedirs(osp.dirname(path), exist_ok=True)
    dump(data, path)
    return path


def evaluate(dataset, path: str, judge: str = DEFAULT_JUDGE, nproc: int = 4):
    """VLMEvalKit's own scoring of the prediction file; `exact_matching` needs no network."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dataset.evaluate(path, model=judge, nproc=nproc)
