"""VLMEvalKit's files at its own paths: prediction files, rank files, the pickles a run leaves, and the
files its scoring derives from a prediction file."""

from __future__ import annotations

import os
import os.path as osp

from . import DatasetError
from ..request import item_key as key
from ..writes import writing

MAX_WORLD_SIZE = 64


def pred_root(work_dir: str, model_name: str) -> str:
    return osp.join(work_dir, model_name)


def vlmeval_state_files(work_dir: str, model_name: str, dataset_name: str) -> list[str]:
    """The pickles VLMEvalKit's `infer_data_job` leaves mid-run, at exactly its own paths."""
    root = pred_root(work_dir, model_name)
    paths = [osp.join(root, f"{model_name}_{dataset_name}_PREV.pkl")]
    paths += [osp.join(root, f"{rank}{world}_{dataset_name}.pkl")
              for world in range(1, MAX_WORLD_SIZE + 1) for rank in range(world)]
    return [p for p in paths if osp.exists(p)]


def rank_file(work_dir: str, model_name: str, dataset_name: str, rank: int, world_size: int) -> str:
    """VLMEvalKit's state file of one rank, `{rank}{world_size}_{dataset}.pkl`, as `infer_data_job` names it."""
    return osp.join(pred_root(work_dir, model_name), f"{rank}{world_size}_{dataset_name}.pkl")


def write_rank_file(dataset, positions, predictions: dict, path: str) -> str:
    """This rank's rows as VLMEvalKit's `infer_data` leaves them: a pickled {index: prediction}."""
    import pickle

    rows = dataset.data.iloc[list(positions)]
    answers = {index: str(predictions[key(index)]) for index in rows["index"]}
    tmp = path + ".partial"
    with writing(path, partial=tmp):
        os.makedirs(osp.dirname(path), exist_ok=True)
        with open(tmp, "wb") as fh:
            pickle.dump(answers, fh)
        os.replace(tmp, path)
    return path


def merge_rank_files(dataset, work_dir: str, model_name: str, world_size: int) -> dict:
    """Every rank's answers, as rank 0 of `infer_data_job` gathers them; a missing rank or row is named."""
    import pickle

    merged = {}
    for rank in range(world_size):
        path = rank_file(work_dir, model_name, dataset.dataset_name, rank, world_size)
        if not osp.exists(path):
            raise DatasetError(f"rank {rank} of {world_size} left no predictions ({path} is missing)")
        with open(path, "rb") as fh:   # written by a rank of this run, under the user's work dir
            merged.update({key(k): v for k, v in pickle.load(fh).items()})
    missing = [i for i in dataset.data["index"] if key(i) not in merged]
    if missing:
        owners = {key(i): p % world_size for p, i in enumerate(dataset.data["index"])}
        raise DatasetError(f"no prediction for items {missing[:10]} (ranks "
                           f"{sorted({owners[key(i)] for i in missing})} of {world_size})")
    return merged


def previous_predictions(work_dir: str, model_name: str, dataset_name: str) -> dict:
    """Predictions an earlier run left: the final file, then VLMEvalKit's pickles; failures excluded."""
    import pickle

    from ..request import FAIL_MSG

    found = {}
    final = prediction_file(work_dir, model_name, dataset_name)
    if osp.exists(final):
        from vlmeval.smp import load

        data = load(final)
        found.update(zip(data["index"], data["prediction"]))
    for path in vlmeval_state_files(work_dir, model_name, dataset_name):
        with open(path, "rb") as fh:   # VLMEvalKit's own state file, under the user's work dir
            found.update(pickle.load(fh))
    return {key(k): v for k, v in found.items() if FAIL_MSG not in str(v)}


def prediction_file(work_dir: str, model_name: str, dataset_name: str) -> str:
    """Where VLMEvalKit's run.py puts predictions: `{work_dir}/{model}/{model}_{dataset}.xlsx`, or
    the format `PRED_FORMAT` names. VLMEvalKit's `get_pred_file_path`, without importing VLMEvalKit
    (a rerun decides what is finished before anything heavy loads; a test checks both agree)."""
    fmt = os.environ.get("PRED_FORMAT", "").lower() or "xlsx"
    if fmt not in ("xlsx", "tsv", "json"):
        raise DatasetError(f"PRED_FORMAT={fmt} is not one VLMEvalKit writes (xlsx, tsv or json)")
    return osp.join(work_dir, model_name, f"{model_name}_{dataset_name}.{fmt}")


def write_predictions(dataset, predictions: dict, path: str) -> bool:
    """The dataset's columns minus `image`, plus `prediction`, as `infer_data_job` writes them.

    Returns whether the predictions differ from the file already there; if not, the file is left
    untouched. When they do, VLMEvalKit's intermediate scoring files of the old predictions
    (`_auxmatch`, `_result`, judge caches, ...) are removed: its `evaluate` reuses them when present
    and would score the old answers.
    """
    from vlmeval.smp import dump

    data = dataset.data.copy()
    predictions = {key(k): v for k, v in predictions.items()}
    missing = [i for i in data["index"] if key(i) not in predictions]
    if missing:
        raise KeyError(f"no prediction for items {missing[:10]}")
    data["prediction"] = [str(predictions[key(i)]) for i in data["index"]]
    if os.getenv("SPLIT_THINK", False):   # VLMEvalKit's option, read where `infer_data_job` reads it
        pairs = [split_thinking(p) for p in data["prediction"]]
        data["prediction"], data["thinking"] = [p for p, _ in pairs], [t for _, t in pairs]
    if "image" in data:
        data.pop("image")
    changed = _predictions_differ(path, data)
    if not changed:   # e.g. a rerun that resumed every answer from this file: leave it as it is
        return False
    stem, suffix = osp.splitext(path)
    tmp = f"{stem}.partial{suffix}"   # same format, then an atomic rename: never half a file
    with writing(path, partial=tmp):
        os.makedirs(osp.dirname(path), exist_ok=True)
        dump(data, tmp)
        with open(tmp, "rb") as fh:       # on disk before we go on: the process may exit without cleanup
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    drop_scoring_files(path)
    return True


def split_thinking(text: str) -> tuple[str, str]:
    """(prediction, thinking) as `infer_data_job` splits an answer when SPLIT_THINK is set: the answer
    after the last </think>, stripped; the reasoning before it (inside <think> when exactly one pair
    is there, else everything before the last </think>, the tag kept). Without SPLIT_THINK, VLMEvalKit
    (and so vlm-batch) keeps the whole answer, reasoning included, as the prediction."""
    if "</think>" not in text:
        return text, ""
    splits = text.split("</think>")
    if len(splits) == 2 and "<think>" in splits[0]:
        return splits[-1].strip(), splits[0].split("<think>")[1].strip()
    return splits[-1].strip(), "</think>".join(splits[:-1]) + "</think>"


def _predictions_differ(path: str, data) -> bool:
    if not osp.exists(path):
        return True
    from vlmeval.smp import load

    try:
        old = load(path)
        before = {key(i): str(p) for i, p in zip(old["index"], old["prediction"])}
    except Exception:
        return True
    return before != {key(i): p for i, p in zip(data["index"], data["prediction"])}


def drop_scoring_files(path: str) -> list[str]:
    """VLMEvalKit's files derived from this prediction file (it names them `{model}_{dataset}_*`)."""
    from vlmeval.smp.file import fetch_aux_files

    keep = {osp.abspath(path)}
    gone = []
    for aux in fetch_aux_files(path):
        if osp.abspath(aux) in keep or aux.endswith("_run.json") or not osp.isfile(aux):
            continue
        os.remove(aux)
        gone.append(aux)
    return gone


def scoring_caches(path: str) -> list[str]:
    """VLMEvalKit's judge caches (`.pkl`) beside this prediction file: per item, what its judge said."""
    from vlmeval.smp.file import fetch_aux_files

    return [aux for aux in fetch_aux_files(path) if aux.endswith(".pkl") and osp.isfile(aux)]


def drop_scores(path: str) -> list[str]:
    """VLMEvalKit's score files of this prediction file, not its judge caches: after a scoring that
    did not finish, the caches hold what was judged and the score files must not look final."""
    from vlmeval.smp.file import fetch_aux_files

    gone = []
    for aux in fetch_aux_files(path):
        if osp.abspath(aux) == osp.abspath(path) or aux.endswith(("_run.json", ".pkl")) or not osp.isfile(aux):
            continue
        os.remove(aux)
        gone.append(aux)
    return gone

