"""`vlm-batch bench`: one engine, the same requests, three ways of feeding it, measured in one run.

(a) one at a time, as VLMEvalKit's loop does; (b) fixed batches of 4, waiting for each, as the seed
did; (c) vlm-batch's batching on already-prepared requests; and the whole pipeline (rows, prompts,
images, prepare, engine) to show what preparation costs. Predictions must agree across all four.
CPU time per item, here and in child processes (vLLM's engine core), shows which side bounds each.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

from . import vlmeval_bridge as bridge
from .engines import engine_stats, load_engine
from .placement import generate
from .prepare import Preparer, build_requests, rows_of


# Every round sends the same items again. An evaluation sees each item once, so caches that only a
# repeat would hit (vLLM's processed-image cache, whole-prompt prefixes) would flatter each round
# after the first: they are off, for every mode alike.
NO_REPEAT_CACHES = {"mm_processor_cache_gb": 0, "enable_prefix_caching": False}


def _timed(fn):
    """fn's result, its wall time, and the CPU time it took here and in child processes."""
    cpu, started = _cpu_seconds(), time.perf_counter()
    out = fn()
    seconds, used = time.perf_counter() - started, _cpu_seconds()
    return out, seconds, (used[0] - cpu[0], used[1] - cpu[1])


def _cpu_seconds() -> tuple[float, float]:
    """CPU time used so far by this process and by its child processes (vLLM's engine core, any
    preparation workers): set against the wall time, it shows which side is the bottleneck."""
    import psutil

    def used(proc):
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:   # a child that ended meanwhile
            return 0.0

    me = psutil.Process()
    return used(me), sum(used(child) for child in me.children(recursive=True))


def _texts(results) -> dict:
    return {r.index: r.prediction for r in results}


def run_bench(card, dataset_name: str, *, engine: str = "vllm", limit: int = 128, fixed: int = 4,
              engine_options: dict | None = None, prep_workers: int = 0, repeat: int = 5,
              log=print) -> dict:
    dataset = bridge.load_dataset(dataset_name, limit)
    failures: list = []
    requests, prep_s, _ = _timed(lambda: list(build_requests(card, dataset, failures)))
    if failures:
        raise RuntimeError(f"{len(failures)} items could not be prepared, e.g. {failures[0].error}")
    fresh = bridge.load_dataset(dataset_name, limit)
    preparer = Preparer(card, {fresh.dataset_name: fresh}, prep_workers)   # forks before the engine
    options = dict(engine_options or {})
    if engine == "vllm":
        options = {**NO_REPEAT_CACHES, **options}
    eng = load_engine(engine, card, **options)
    chunks = [requests[i:i + fixed] for i in range(0, len(requests), fixed)]
    runs = {
        "one_at_a_time": lambda: [r for q in requests for r in eng.run_batch([q])],
        f"fixed_{fixed}": lambda: [r for c in chunks for r in eng.run_batch(c)],
        "vlm_batch": lambda: list(eng.generate(requests)),
        "pipeline": lambda: list(generate(card, eng, preparer.requests(failures, rows_of(fresh)))),
    }
    times: dict = {k: [] for k in runs}
    cpu: dict = {k: [] for k in runs}
    tokens: list = []
    outputs: dict = {k: [] for k in runs}
    details = {}
    try:
        eng.run_batch(requests[:2])   # warm-up: first-call costs are not batching's business
        log(f"bench: {len(requests)} items of {dataset_name} on {card.name} ({engine}), "
            f"median of {repeat} interleaved rounds")
        for _ in range(repeat):   # interleaved, so drift in machine load hits every mode alike
            for name, fn in runs.items():
                out, seconds, used = _timed(fn)
                times[name].append(seconds)
                cpu[name].append(used)
                outputs[name].append(_texts(out))
                if name == "vlm_batch":
                    details = engine_stats(eng)
                    tokens = [r.output_tokens for r in out]
                    details["failed_items"] = sum(not r.ok for r in out)
    finally:
        eng.close()
        preparer.close()
    modes = {k: statistics.median(v) for k, v in times.items()}
    per_item = {k: {"wall": 1e3 * modes[k] / len(requests),
                    "this_process": 1e3 * statistics.median(c[0] for c in v) / len(requests),
                    "child_processes": 1e3 * statistics.median(c[1] for c in v) / len(requests)}
                for k, v in cpu.items()}
    for name, seconds in modes.items():
        ms = per_item[name]
        log(f"  {name.replace('_', ' '):<16} {len(requests) / seconds:8.2f} items/s   per item: {ms['wall']:.2f} ms "
            f"wall, CPU {ms['this_process']:.2f} ms here + {ms['child_processes']:.2f} ms in child processes")
    rate = {k: len(requests) / v for k, v in modes.items()}
    reference = outputs["one_at_a_time"][0]
    agree = {k: all(o == reference for o in v) for k, v in outputs.items()}
    report = {
        "model": card.name, "dataset": dataset_name, "engine": engine, "items": len(requests),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "prepare_s": round(prep_s, 3),
        "mean_output_tokens": round(statistics.mean(tokens), 2) if tokens else None,
        "caches_off": sorted(NO_REPEAT_CACHES) if engine == "vllm" else [],
        "prep_workers": preparer.workers,
        "repeat": repeat,
        "seconds": {k: round(v, 3) for k, v in modes.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "items_per_s": {k: round(v, 2) for k, v in rate.items()},
        "ms_per_item": {k: {part: round(x, 3) for part, x in v.items()} for k, v in per_item.items()},
        "ratios": {
            "vlm_batch_vs_one_at_a_time": round(rate["vlm_batch"] / rate["one_at_a_time"], 2),
            f"vlm_batch_vs_fixed_{fixed}": round(rate["vlm_batch"] / rate[f"fixed_{fixed}"], 2),
            "pipeline_vs_bare_engine": round(rate["pipeline"] / rate["vlm_batch"], 3),
        },
        "same_predictions": agree,
        "engine_details": details,
        "warnings": _warnings(details),
    }
    return report


def _warnings(details: dict) -> list[str]:
    """What would make the batched figure not a batching figure: batches split, items retried alone or lost."""
    processor = details.get("processor", {})
    out = [f"{processor[k]} {k} in the batched run: its speed is not that of whole batches"
           for k in ("splits", "fallbacks") if processor.get(k)]
    if details.get("failed_items"):
        out.append(f"{details['failed_items']} items failed in the batched run")
    return out


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)


def write_chart(report: dict, path: str) -> None:
    """A bar chart of items/s per way of feeding the engine, each bar labelled with its speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["items_per_s"]
    names = list(rates)
    labels = {"one_at_a_time": "one at a time\n(VLMEvalKit's loop)", "vlm_batch": "vlm-batch\n(prepared requests)",
              "pipeline": "vlm-batch\n(whole pipeline)"}
    base = rates["one_at_a_time"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    colours = ["#9e9e9e", "#bdbdbd", "#1f77b4", "#4f9fd8"]
    bars = ax.bar([labels.get(n, n.replace("_", " ").replace("fixed ", "fixed batches of ")) for n in names],
                  [rates[n] for n in names], color=colours[:len(names)])
    for rect, name in zip(bars, names):
        ax.annotate(f"{rates[name]:.1f}/s\n{rates[name] / base:.1f}x", (rect.get_x() + rect.get_width() / 2,
                    rect.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("items per second")
    ax.set_ylim(0, max(rates.values()) * 1.25)
    ax.set_title(f"{report['model']} on {report['items']} items of {report['dataset']} ({report['engine']}, "
                 f"{report['machine']})", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
