"""`vlm-batch bench`: the same items fed to the engine several ways, measured in one run.

(a) our engine given one request at a time; (b) fixed batches of 4, waiting for each, as the seed
did; (c) vlm-batch's batching on already-prepared requests; (d) the whole pipeline (rows, prompts,
images, prepare, engine), which is what `eval` runs; and, on vLLM where VLMEvalKit has a vLLM path
for the model, (e) VLMEvalKit's own loop: its model class on its own vLLM engine, a row at a time.
Predictions must agree across all of them. CPU time per item, here and in child processes (vLLM's
engine core), shows which side bounds each.

Each round of the pipeline and of VLMEvalKit's loop starts cold for what an evaluation does once per
item: VLMEvalKit's image files under `$LMUData/images/NAME` are removed first, so they are decoded
and written again. `--warm` keeps them, as a second evaluation of the same dataset finds them.

Workloads shaped like real benchmarks: `--dataset VLMBatchPhotos` (1024x768 JPEGs) or `VLMBatchScans`
(2000x1500), and `--answer-tokens N`, which makes every mode, VLMEvalKit's loop included, write
exactly N tokens per answer (an open-answer or caption set's length).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import platform
import shutil
import statistics
import time

from .engines import engine_stats, load
from .placement.stream import generate
from .prepare import Preparer, build_requests, rows_of
from .stages import Ledger, lines
from .stages import here as costs
from .vlmeval.datasets import load_dataset
from .vlmeval.loop import VLMEvalLoop, has_vllm_path


LABELS = {
    "one_at_a_time": "our engine,\none request at a time",
    "fixed_4": "our engine,\nfixed batches of 4",
    "vlm_batch": "vlm-batch\n(prepared requests)",
    "pipeline": "vlm-batch\n(whole pipeline, = eval)",
    "vlmeval_loop": "VLMEvalKit's own loop\n(its class, its vLLM)",
}

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
              engine_options: dict | None = None, prep_workers: int | None = None, repeat: int = 5,
              answer_tokens: int | None = None, warm: bool = False, log=print) -> dict:
    if answer_tokens:
        card = forced(card, engine, answer_tokens)
    dataset = load_dataset(dataset_name, limit)
    failures: list = []
    requests, prep_s, _ = _timed(lambda: list(build_requests(card, dataset, failures)))
    if failures:
        raise RuntimeError(f"{len(failures)} items could not be prepared, e.g. {failures[0].error}")
    fresh = load_dataset(dataset_name, limit)
    options = dict(engine_options or {})
    render = None
    if engine == "vllm":
        from .engines.vllm import rendering

        options = {**NO_REPEAT_CACHES, **options}
        render = rendering(card, options)
    preparer = Preparer(card, {fresh.dataset_name: fresh}, prep_workers, rendering=render)   # forks before the engine
    eng = load(engine, card, **options)
    chunks = [requests[i:i + fixed] for i in range(0, len(requests), fixed)]

    stage_costs: dict = {}

    def pipeline():
        if not warm:   # cold: as an evaluation meets each item once
            shutil.rmtree(fresh.img_root, ignore_errors=True)
        costs.take()   # what the other modes left
        preparer.ledger = Ledger()
        out = list(generate(card, eng, preparer.requests(failures, rows_of(fresh))))
        preparer.ledger.add(costs.take(), "this process")
        stage_costs.update(preparer.ledger.report())
        return out

    runs = {
        "one_at_a_time": lambda: [r for q in requests for r in eng.run_batch([q])],
        f"fixed_{fixed}": lambda: [r for c in chunks for r in eng.run_batch(c)],
        "vlm_batch": lambda: list(eng.generate(requests)),
        "pipeline": pipeline,
    }
    loop = VLMEvalLoop(card, load_dataset(dataset_name, limit), options, answer_tokens, warm) if engine == "vllm" and \
        has_vllm_path(card) else None
    if loop is not None:
        runs["vlmeval_loop"] = loop
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
        ceiling = feed_ceiling(card, dataset_name, limit, eng, log, warm=warm, rendering=render) \
            if engine == "vllm" else {}
    finally:
        eng.close()
        preparer.close()
        if loop is not None:
            loop.close()
    modes = {k: statistics.median(v) for k, v in times.items()}
    per_item = {k: {"wall": 1e3 * modes[k] / len(requests),
                    "this_process": 1e3 * statistics.median(c[0] for c in v) / len(requests),
                    "child_processes": 1e3 * statistics.median(c[1] for c in v) / len(requests)}
                for k, v in cpu.items()}
    for name, seconds in modes.items():
        ms = per_item[name]
        log(f"  {name.replace('_', ' '):<16} {len(requests) / seconds:8.2f} items/s (first round "
            f"{len(requests) / times[name][0]:.2f})   per item: {ms['wall']:.2f} ms wall, CPU "
            f"{ms['this_process']:.2f} ms here + {ms['child_processes']:.2f} ms in child processes")
    stage_costs = {"base64": {"this process": base64_ms(dataset)}, **stage_costs}
    log("  CPU per item in the whole pipeline, by stage and process (the last round; base64 measured "
        "apart, it is part of the dump):")
    for line in lines(stage_costs):
        log(line)
    rate = {k: len(requests) / v for k, v in modes.items()}
    first = {k: round(len(requests) / v[0], 2) for k, v in times.items()}
    reference = outputs["one_at_a_time"][0]
    agree = {k: all(o == reference for o in v) for k, v in outputs.items()}
    report = {
        "model": card.name, "dataset": dataset_name, "engine": engine, "items": len(requests),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "prepare_s": round(prep_s, 3),
        "mean_output_tokens": round(statistics.mean(tokens), 2) if tokens else None,
        "caches_off": sorted(NO_REPEAT_CACHES) if engine == "vllm" else [],
        "prep_workers": preparer.workers,
        "answer_tokens": answer_tokens,
        "image_files": "warm: kept between rounds" if warm else "cold: written again each round",
        "repeat": repeat,
        "seconds": {k: round(v, 3) for k, v in modes.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "items_per_s": {k: round(v, 2) for k, v in rate.items()},
        "items_per_s_first_round": first,
        "modes": {k: LABELS[k].replace("\n", " ") for k in rate if k in LABELS},
        "ms_per_item": {k: {part: round(x, 3) for part, x in v.items()} for k, v in per_item.items()},
        "ratios": {
            "vlm_batch_vs_one_at_a_time": round(rate["vlm_batch"] / rate["one_at_a_time"], 2),
            f"vlm_batch_vs_fixed_{fixed}": round(rate["vlm_batch"] / rate[f"fixed_{fixed}"], 2),
            "pipeline_vs_bare_engine": round(rate["pipeline"] / rate["vlm_batch"], 3),
            **({"pipeline_vs_vlmeval_loop": round(rate["pipeline"] / rate["vlmeval_loop"], 2)}
               if "vlmeval_loop" in rate else {}),
        },
        "same_predictions": agree,
        "engine_details": details,
        "stage_cpu_ms_per_item": stage_costs,
        "feed_ceiling_items_per_s": ceiling,
        "warnings": _warnings(details),
    }
    return report


def base64_ms(dataset) -> float:
    """CPU ms per item of decoding the TSV's base64 alone (VLMEvalKit's dump does it first)."""
    fields = [v for v in dataset.data["image"] if isinstance(v, str) and len(v) > 64] if "image" in dataset.data else []
    if not fields:
        return 0.0
    started = time.thread_time()
    for value in fields:
        base64.b64decode(value)
    return round(1e3 * (time.thread_time() - started) / len(fields), 3)


def feed_ceiling(card, dataset_name: str, limit: int, eng, log, workers=None, warm: bool = False,
                 rendering=None) -> dict:
    """Items/s the pipeline delivers with the model taken away, for each number of preparation
    workers: rows to VLMEvalKit's prompts and images, the plugin's requests, and vLLM's renderer
    (its multimodal processing: in the workers where `eval` would put it there, else in this
    process), everything `eval` does before the model. If it is not well above the engine's rate, a
    faster engine (a GPU) would wait on the CPU."""
    from .engines.threads import cores

    dataset = load_dataset(dataset_name, limit)
    counts = workers or sorted({0, 1, 2, min(4, max(2, cores()))})
    out = {}
    for count in counts:
        if not warm:
            shutil.rmtree(dataset.img_root, ignore_errors=True)
        with Preparer(card, {dataset.dataset_name: dataset}, count, rendering=rendering) as preparer:
            started, n = time.perf_counter(), 0
            for request in preparer.requests([], rows_of(dataset)):
                eng.render(request)
                n += 1
            out[count] = round(n / (time.perf_counter() - started), 2)
            where = "the workers" if preparer.rendering is not None else "this process"
        log(f"  feed ceiling, {count} preparation workers: {out[count]:8.2f} items/s (no model: rows to "
            f"vLLM's renderer, which runs in {where})")
    return out


def forced(card, engine: str, tokens: int):
    """The card, its every answer made exactly `tokens` long: no end token before then."""
    force = {"min_tokens": tokens} if engine == "vllm" else {"min_new_tokens": tokens}
    return dataclasses.replace(card, max_new_tokens=tokens, generation={**(card.generation or {}), **force})


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
    labels = LABELS
    base = rates["one_at_a_time"]
    fig, ax = plt.subplots(figsize=(8.5, 4.4), dpi=110)
    colours = [{"vlmeval_loop": "#d62728"}.get(n, c) for n, c in
               zip(names, ["#9e9e9e", "#bdbdbd", "#1f77b4", "#4f9fd8", "#d62728"])]
    bars = ax.bar([labels.get(n, n.replace("_", " ").replace("fixed ", "fixed batches of\n")) for n in names],
                  [rates[n] for n in names], color=colours)
    for rect, name in zip(bars, names):
        ax.annotate(f"{rates[name]:.1f}/s\n{rates[name] / base:.1f}x", (rect.get_x() + rect.get_width() / 2,
                    rect.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(f"items per second (x: against {labels['one_at_a_time'].replace(chr(10), ' ')})",
                  fontsize=8)
    ax.set_ylim(0, max(rates.values()) * 1.25)
    ax.set_title(f"{report['model']} on {report['items']} items of {report['dataset']} ({report['engine']}, "
                 f"{report['machine']})", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
