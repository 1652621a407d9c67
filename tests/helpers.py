"""Builders of small VLMEvalKit-format data for tests."""

from __future__ import annotations

import random

from vlm_batch import sample_data


def mmbench_rows(n: int = 12, seed: int = 1):
    """MMBench-style rows: hints on some, 2-4 options, a Chinese question, shuffled answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(sample_data.SHAPES), rng.choice(list(sample_data.COLOURS))
        n_opt = 2 + i % 3
        options = rng.sample([s for s in sample_data.SHAPES if s != shape], n_opt - 1) + [shape]
        rng.shuffle(options)
        question = "图中是什么形状？" if i % 5 == 4 else "Which shape is drawn?"
        row = {"index": 1000 + i, "question": question,
               "hint": f"The shape is {colour}." if i % 2 else float("nan"),
               "image": sample_data.encode(sample_data.draw(shape, colour, rng)),
               "answer": "ABCD"[options.index(shape)], "category": "shape", "l2-category": "perception",
               "split": "dev"}
        for letter in "ABCD":
            row[letter] = options["ABCD".index(letter)] if "ABCD".index(letter) < n_opt else float("nan")
        rows.append(row)
    return rows


def write_dataset(root, name: str, rows) -> str:
    sample_data.write_tsv(root / f"{name}.tsv", rows)
    return name
