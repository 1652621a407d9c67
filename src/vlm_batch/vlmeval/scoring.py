"""VLMEvalKit's scoring of a prediction file, and what must not pass silently in it."""

from __future__ import annotations

import warnings

from . import DEFAULT_JUDGE, DatasetError

FALLBACK_WARNING = "will use exact matching"   # VLMEvalKit's words when its judge's working() check fails


class JudgeFellBack(RuntimeError):
    """VLMEvalKit found the judge not working and scored by exact matching instead."""


def evaluate(dataset, path: str, judge: str = DEFAULT_JUDGE, nproc: int = 4, *, strict_judge: bool = False,
             **judge_kwargs):
    """VLMEvalKit's own scoring of the prediction file; `exact_matching` needs no network.

    `judge_kwargs` are VLMEvalKit's judge arguments (`api_base`, `key`, ...). With `strict_judge`, a judge
    VLMEvalKit finds not working is an error (JudgeFellBack) instead of its quiet fall back to exact matching.
    """
    if type(dataset).__name__ == "CustomVQADataset":   # its evaluate raises a bare NotImplementedError
        raise DatasetError(f"VLMEvalKit loads the local TSV '{dataset.dataset_name}' (no options) as its "
                           "CustomVQADataset, which cannot score; name its kind with --kind yorn|vqa|mcq "
                           "(or a config `class`) and rerun with --mode eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dataset.evaluate(path, model=judge, nproc=nproc, **judge_kwargs)
    if judge != DEFAULT_JUDGE and any(FALLBACK_WARNING in str(w.message) for w in caught):
        if strict_judge:
            raise JudgeFellBack(f"VLMEvalKit found the judge {judge} not working and fell back to exact matching")
        import logging

        logging.getLogger(__name__).warning("%s: VLMEvalKit found the judge %s not working (no API key?) and "
                                            "scored by exact matching", dataset.dataset_name, judge)
    return result

