"""Train the embedded `tiny-qwen2-vl` to answer the sample set's shape and colour questions.

    python -m vlm_batch_qwen2_vl.train --out DIR [--seed 0]

Training rows come from the sample-set generator with other seeds than the sample set, and go
through the same path as an evaluation (VLMEvalKit's prompt, the plugin's `prepare`), so the model
learns exactly the prompts it will be asked. It answers with the option's text ("circle"), which
VLMEvalKit's exact matching maps to the option's letter, as it does for real models that answer in
words. Every other batch is the multiple-choice rows, the others a shorter "name it" form of the
same image ("What shape is shown in the image? Answer in one word."); a linear probe on the pooled vision
tokens classifies shape and colour alongside (it is discarded; it only gives the small vision tower
a direct signal).

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

log = logging.getLogger("vlm_batch_qwen2_vl.train")

TRAIN_SEED_OFFSET = 1000     # the sample set uses seed 0: training never sees its rows
END = "<|im_end|>"


def training_examples(n: int, seed: int) -> list[dict]:
    """`n` generated rows, each as its multiple-choice request and as a name-it request."""
    from vlm_batch import sample_data, vlmeval_bridge
    from vlm_batch.prepare import build_requests
    from vlm_batch.plugins import get_model

    card = get_model("tiny-qwen2-vl")
    name = f"VLMBatchShapesTrain{seed}"
    drawn = sample_data.items(n, seed=TRAIN_SEED_OFFSET + seed)
    rows = [row for row, _, _ in drawn]
    truth = {row["index"]: (shape, colour) for row, shape, colour in drawn}
    sample_data.write_tsv(sample_data.lmudata_root() / f"{name}.tsv", rows)
    dataset = vlmeval_bridge.load_dataset(name)
    failures: list = []
    requests = list(build_requests(card, dataset, failures))
    assert not failures, failures[:3]
    by_index = {r["index"]: r for r in rows}
    out = []
    for req in requests:
        row = by_index[req.index]
        word = row[row["answer"]]
        image_part = req.prompt.split("<|vision_end|>")[0] + "<|vision_end|>"
        named = image_part + row["question"] + " Answer in one word." + END + "\n<|im_start|>assistant\n"
        out.append({"mcq": (req.prompt, word), "named": (named, word), "images": req.images,
                    "shape": sample_data.SHAPES.index(truth[req.index][0]),
                    "colour": list(sample_data.COLOURS).index(truth[req.index][1])})
    return out


def encode(processor, examples: list[dict], chunk: int = 256) -> list[dict]:
    """Both forms of each example through the processor once: token ids, pixels, answer start."""
    tokenizer = processor.tokenizer
    for at in range(0, len(examples), chunk):
        part = examples[at:at + chunk]
        for form in ("mcq", "named"):
            enc = processor(text=[ex[form][0] + ex[form][1] + END for ex in part],
                            images=[ex["images"] for ex in part], padding=True, return_tensors="pt")
            pixels = enc["pixel_values"].split([int(g.prod()) for g in enc["image_grid_thw"]])
            for row, ex in enumerate(part):
                keep = enc["attention_mask"][row].bool()
                ids = enc["input_ids"][row][keep]
                answer_len = len(tokenizer(ex[form][1] + END, add_special_tokens=False).input_ids)
                ex[form + "_ids"] = (ids, enc["mm_token_type_ids"][row][keep], len(ids) - answer_len)
                ex["pixel_values"], ex["image_grid_thw"] = pixels[row], enc["image_grid_thw"][row:row + 1]
    return examples


def collate(batch: list[tuple[dict, str]], pad_id: int) -> dict:
    """Right-padded batch of (example, form); the loss sees only each answer and its end token."""
    import torch

    width = max(len(ex[form + "_ids"][0]) for ex, form in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask, kinds = torch.zeros_like(ids), torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (ex, form) in enumerate(batch):
        tokens, token_kinds, answer_from = ex[form + "_ids"]
        n = len(tokens)
        ids[row, :n], mask[row, :n], kinds[row, :n] = tokens, 1, token_kinds
        labels[row, answer_from:n] = tokens[answer_from:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": kinds,
            "pixel_values": torch.cat([ex["pixel_values"] for ex, _ in batch]),
            "image_grid_thw": torch.cat([ex["image_grid_thw"] for ex, _ in batch])}


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

    def loss(self, batch: list[tuple[dict, str]], inputs: dict):
        import torch
        import torch.nn.functional as F

        sizes = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]   # 2x2 patches merge into a token
        pooled = torch.stack([f.mean(0) for f in self.features.split(sizes)])
        logits = self.linear(pooled)
        shapes = torch.tensor([ex["shape"] for ex, _ in batch])
        colours = torch.tensor([ex["colour"] for ex, _ in batch])
        return F.cross_entropy(logits[:, :4], shapes) + F.cross_entropy(logits[:, 4:], colours)


def train(out: Path, *, seed: int = 0, steps: int = 1500, rows: int = 3000, batch: int = 32,
          lr: float = 1e-3) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from . import build_tiny

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
    losses = []
    for step in range(steps):
        form = "named" if step % 2 else "mcq"   # one form per batch: no padding to the longer one
        forms = [(ex, form) for ex in rng.sample(examples, batch)]
        inputs = collate(forms, pad_id)
        loss = model(**inputs).loss + 0.5 * probe.loss(forms, inputs)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, steps, sum(losses[-50:]) / len(losses[-50:]),
                     time.perf_counter() - started)
    model.eval()
    model.save_pretrained(out)
    report = {"seed": seed, "steps": steps, "rows": rows, "batch": batch,
              "lr": lr, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("LMUData", tempfile.mkdtemp(prefix="vlm-batch-train-"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = train(args.out, seed=args.seed, steps=args.steps, rows=args.rows)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
