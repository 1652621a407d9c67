"""Train the embedded `tiny-qwen2-vl` to answer the sample sets of every kind.

    python -m vlm_batch_testing.train_qwen2_vl --out DIR [--seed 0]

Training rows come from the sample-set generators with other seeds than the sample sets, and go
through the same path as an evaluation (VLMEvalKit's prompt for the kind, the plugin's `prepare`),
so the model learns exactly the prompts it will be asked. Each batch is one form, in turn:
multiple choice answered with the option's text ("circle", which VLMEvalKit's exact matching maps
to the option's letter, as it does for real models that answer in words), a shorter "name it" form
of the same image, Yes/No, open answer, and multiple choice over several images (answered, like the
first, with the option's text). A linear probe on the pooled vision tokens classifies shape and colour
alongside (it is discarded; it only gives the small vision tower a direct signal).

Deterministic for a seed on one machine (CPU, torch's default threads).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vlm_batch_testing.train_qwen2_vl")

TRAIN_SEED_OFFSET = 1000     # the sample set uses seed 0: training never sees its rows
END = "<|im_end|>"


def _requests(name: str, rows: list[dict], kind: str | None):
    """The rows as the evaluation asks them: VLMEvalKit's prompt for that kind, the plugin's prepare."""
    from vlm_batch.demo import sample_data
    from vlm_batch.vlmeval import lmudata_root
    from vlm_batch.vlmeval.datasets import load_dataset
    from vlm_batch.prepare import build_requests
    from vlm_batch.plugins import get_model

    sample_data.write_tsv(lmudata_root() / f"{name}.tsv", rows)
    failures: list = []
    requests = list(build_requests(get_model("tiny-qwen2-vl"), load_dataset(name, kind=kind),
                                   failures))
    assert not failures, failures[:3]
    return requests


def training_examples(n: int, seed: int) -> list[dict]:
    """`n` generated rows of each sample set's kind, as the evaluation asks them: multiple choice
    (answered with the option's word, plus a name-it form of the same image), Yes/No, open answer,
    and multiple choice over several images (answered with the option's word)."""
    from vlm_batch.demo import sample_data

    s = TRAIN_SEED_OFFSET + seed
    drawn = sample_data.items(n, seed=s)
    rows = [row for row, _, _ in drawn]
    truth = {row["index"]: (shape, colour) for row, shape, colour in drawn}
    by_index = {r["index"]: r for r in rows}
    out = []
    for req in _requests(f"VLMBatchShapesTrain{seed}", rows, None):
        row = by_index[req.index]
        word = row[row["answer"]]
        image_part = req.prompt.split("<|vision_end|>")[0] + "<|vision_end|>"
        named = image_part + row["question"] + " Answer in one word." + END + "\n<|im_start|>assistant\n"
        probe = {"shape": sample_data.SHAPES.index(truth[req.index][0]),
                 "colour": list(sample_data.COLOURS).index(truth[req.index][1])}
        out.append({"form": "mcq", "text": (req.prompt, word), "images": req.images, **probe})
        out.append({"form": "named", "text": (named, word), "images": req.images, **probe})
    for form, make, kind in (("yorn", sample_data.yn_rows, "yorn"), ("vqa", sample_data.vqa_rows, "vqa"),
                             ("multi", sample_data.multi_rows, "mcq")):
        rows = make(n, seed=s + 1 + len(out))
        by_index = {r["index"]: r for r in rows}
        for req in _requests(f"VLMBatchShapes{form}Train{seed}", rows, kind):
            row = by_index[req.index]
            answer = row[row["answer"]] if form == "multi" else sample_data.first_answer(row["answer"])
            out.append({"form": form, "text": (req.prompt, answer), "images": req.images})
    return out


def encode(processor, examples: list[dict], chunk: int = 256) -> list[dict]:
    """Each example through the processor once: token ids, pixels (of all its images), answer start."""
    import torch

    tokenizer = processor.tokenizer
    for at in range(0, len(examples), chunk):
        part = examples[at:at + chunk]
        enc = processor(text=[ex["text"][0] + ex["text"][1] + END for ex in part],
                        images=[ex["images"] for ex in part], padding=True, return_tensors="pt")
        pixels = list(enc["pixel_values"].split([int(g.prod()) for g in enc["image_grid_thw"]]))
        grids = list(enc["image_grid_thw"].split(1))
        for row, ex in enumerate(part):
            keep = enc["attention_mask"][row].bool()
            ids = enc["input_ids"][row][keep]
            answer_len = len(tokenizer(ex["text"][1] + END, add_special_tokens=False).input_ids)
            ex["ids"] = (ids, enc["mm_token_type_ids"][row][keep], len(ids) - answer_len)
            k = len(ex["images"])
            ex["pixel_values"], ex["image_grid_thw"] = torch.cat(pixels[:k]), torch.cat(grids[:k])
            del pixels[:k], grids[:k]
    return examples


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-padded batch; the loss sees only each answer and its end token."""
    import torch

    width = max(len(ex["ids"][0]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask, kinds = torch.zeros_like(ids), torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, ex in enumerate(batch):
        tokens, token_kinds, answer_from = ex["ids"]
        n = len(tokens)
        ids[row, :n], mask[row, :n], kinds[row, :n] = tokens, 1, token_kinds
        labels[row, answer_from:n] = tokens[answer_from:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": kinds,
            "pixel_values": torch.cat([ex["pixel_values"] for ex in batch]),
            "image_grid_thw": torch.cat([ex["image_grid_thw"] for ex in batch])}


class VisionProbe:
    """Shape and colour classified from the mean of each image's vision tokens, as the model computes
    them in its own forward pass (a hook keeps them; no second pass)."""

    def __init__(self, model):
        import torch

        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, 4 + 6)
        self.features = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = getattr(output, "pooler_output", output)

    def loss(self, batch: list[dict], inputs: dict):
        import torch
        import torch.nn.functional as F

        sizes = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]   # 2x2 patches merge into a token
        pooled = torch.stack([f.mean(0) for f in self.features.split(sizes)])
        logits = self.linear(pooled)
        shapes = torch.tensor([ex["shape"] for ex in batch])
        colours = torch.tensor([ex["colour"] for ex in batch])
        return F.cross_entropy(logits[:, :4], shapes) + F.cross_entropy(logits[:, 4:], colours)


FORMS = ("mcq", "named", "yorn", "vqa", "multi")   # a batch each, in turn
FIRST_FORMS = ("mcq", "named")   # the first steps: learn to see before learning to compare and look across images


def train(out: Path, *, seed: int = 0, steps: int = 3000, first: int = 1200, rows: int = 2000, batch: int = 32,
          lr: float = 1e-3) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from .qwen2_vl import build_tiny

    torch.manual_seed(seed)
    started = time.perf_counter()
    build_tiny(out, init_std=0.02)
    processor = Qwen2VLProcessor.from_pretrained(out)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    examples = encode(processor, training_examples(rows, seed))
    pad_id = processor.tokenizer.pad_token_id
    log.info("encoded %d examples (%.0fs)", len(examples), time.perf_counter() - started)
    torch.set_grad_enabled(True)   # importing VLMEvalKit switches autograd off process-wide
    model.train()
    probe = VisionProbe(model)
    params = list(model.parameters()) + list(probe.linear.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    by_form = {form: [ex for ex in examples if ex["form"] == form] for form in FORMS}
    losses, per_form = [], {}
    for step in range(steps):
        cycle = FIRST_FORMS if step < first else FORMS
        form = cycle[step % len(cycle)]   # one form per batch: no padding to the longer one
        chosen = rng.sample(by_form[form], batch)
        inputs = collate(chosen, pad_id)
        loss = model(**inputs).loss
        if "shape" in chosen[0]:   # single-image rows: the probe's direct signal for the vision tower
            loss = loss + 0.5 * probe.loss(chosen, inputs)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        per_form.setdefault(form, []).append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            recent = {f: round(sum(v[-10:]) / len(v[-10:]), 3) for f, v in per_form.items()}
            log.info("step %d/%d loss %.4f %s (%.0fs)", step, steps, sum(losses[-50:]) / len(losses[-50:]),
                     recent, time.perf_counter() - started)
    model.eval()
    model.save_pretrained(out)
    report = {"seed": seed, "steps": steps, "first": first, "rows": rows, "batch": batch, "forms": list(FORMS),
              "lr": lr, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--first", type=int, default=1200, help="steps on single-image multiple choice only")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("LMUData", tempfile.mkdtemp(prefix="vlm-batch-train-"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = train(args.out, seed=args.seed, steps=args.steps, first=args.first, rows=args.rows)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
