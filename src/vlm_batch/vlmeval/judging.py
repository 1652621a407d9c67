"""VLMEvalKit's side of an LLM judge: its `working()` check, which datasets ask a judge, and surgery on
its judge caches after a judge failed mid-scoring."""

from __future__ import annotations

import os
import warnings

from .files import scoring_caches

# Markers VLMEvalKit leaves in its judge caches for an item whose judge call failed (see `forget_failed`).
FAILED_MARKERS = ("Failed to obtain answer via API", "Failed to predict, thus randomly generate one")
NOT_JUDGED = "Failed in Prefetch, no GPT-based answer matching"   # what it caches when it fell back


def working(**judge_kwargs) -> bool:
    """VLMEvalKit's own `working()` test of the judge its arguments build (`build_judge` drops nproc)."""
    from vlmeval.dataset.utils.judge_util import build_judge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_judge(**judge_kwargs).working()


def needs_llm(dataset) -> bool:
    """Whether VLMEvalKit's evaluate of this dataset asks an LLM judge (rule-based VQA scoring does not)."""
    return type(dataset).__name__ not in ("ImageVQADataset", "CustomVQADataset")



def _caches(prediction_file: str):
    """(path, contents) of VLMEvalKit's judge caches beside this prediction file, under the work dir
    the user gave; VLMEvalKit's own evaluate unpickles the same files."""
    import pickle

    for cache in scoring_caches(prediction_file):
        try:
            with open(cache, "rb") as fh:
                data = pickle.load(fh)
        except Exception:
            continue
        if isinstance(data, dict):
            yield cache, data


def forget_failed(prediction_file: str, extra: tuple = ()) -> int:
    """Drop, from VLMEvalKit's judge caches of this prediction file, the items whose judge call failed
    (VLMEvalKit caches a random pick for them): a later `--mode eval` judges exactly those again.
    Returns how many were dropped."""
    import pickle

    dropped = 0
    for cache, data in _caches(prediction_file):
        # a Y/N cache holds the judge's word; "Unknown" is what a failed call leaves (asked again anyway)
        bad = [k for k, v in data.items()
               if v == "Unknown" or any(m in str(v) for m in FAILED_MARKERS + tuple(extra))]
        if bad:
            for k in bad:
                del data[k]
            tmp = cache + ".partial"
            with open(tmp, "wb") as fh:
                pickle.dump(data, fh)
            os.replace(tmp, cache)
            dropped += len(bad)
    return dropped

