"""Judge calls per second on the tiny local judge: VLMEvalKit's serial way (nproc 1) against vlm-batch's
default concurrency (64), on the same items, through one `vllm serve` of the tiny judge.

    python tools/bench_judge.py [--items 64] [--repeat 2] [--json bench-judge.json]

Each round scores a fresh copy of the same predictions (none of which exact matching can map, so
every item is one judge call) with VLMEvalKit's own MCQ evaluate; rounds alternate between the two
settings. It prints each round and the median calls/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.files import prediction_file, write_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", default="bench-judge.json")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="vlm-batch-bench-judge-")
    os.environ.setdefault("LMUData", os.path.join(root, "LMUData"))
    os.makedirs(os.environ["LMUData"], exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    from pathlib import Path

    from vlm_batch.demo import sample_data

    from vlm_batch_testing import judge as tiny_judge
    from vlm_batch.judge.server import JudgeServer
    from vlm_batch.judge.service import Judge, score_with

    name = "JudgeBench"
    rows = sample_data.rows(args.items, seed=5)
    sample_data.write_tsv(Path(os.environ["LMUData"]) / f"{name}.tsv", rows)
    dataset = load_dataset(name)
    preds = {row["index"]: "I really cannot tell from this picture." for row in rows}
    model = tiny_judge.checkpoint()
    rounds = []
    with JudgeServer(model, served_name="tiny-judge") as server:
        print(f"server up in {server.started_s:.1f}s on {server.base_url}")
        for r in range(args.repeat):
            for nproc in (1, args.concurrency):
                path = prediction_file(os.path.join(root, f"r{r}-n{nproc}"), "bench", name)
                write_predictions(dataset, preds, path)
                judge = Judge(name="tiny-judge", base_url=server.base_url, nproc=nproc, model="tiny-judge",
                              server=server)
                _score, stats = score_with(dataset, path, judge)
                rounds.append({"round": r, **stats})
                print(f"round {r} nproc {nproc}: {stats['calls']} calls in {stats['time_s']:.2f}s = "
                      f"{stats['calls_per_s']:.1f} calls/s, failures {stats['failures']}, "
                      f"peak running {stats['peak_running']}")
    median = {n: statistics.median(x["calls_per_s"] for x in rounds if x["nproc"] == n)
              for n in (1, args.concurrency)}
    report = {"items": args.items, "rounds": rounds, "median_calls_per_s": median,
              "ratio": round(median[args.concurrency] / median[1], 2), "cpus": os.cpu_count()}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"median calls/s: nproc 1 {median[1]:.1f}, nproc {args.concurrency} {median[args.concurrency]:.1f}; "
          f"ratio {report['ratio']}x")


if __name__ == "__main__":
    main()
