"""The sample sets: drawn shapes, written as VLMEvalKit TSVs on first use, one per dataset kind.

- `VLMBatchShapes`: multiple choice, one image ("What shape is shown in the image?" A-D);
- `VLMBatchShapesYN`: Yes/No ("Is the shape in the image red?", "... a circle?"), a VLMEvalKit Y/N dataset;
- `VLMBatchShapesVQA`: open answer ("What colour is the shape in the image?" -> "red"), VQA;
- `VLMBatchShapesMulti`: multiple choice over 2-3 images in a row ("Which colour is the circle?").

Generated from a seed, so the demo and the tests need no download and get the same rows everywhere.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import random
import string
from pathlib import Path

NAME = "VLMBatchShapes"
YN, VQA, MULTI = "VLMBatchShapesYN", "VLMBatchShapesVQA", "VLMBatchShapesMulti"
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
    "purple": (140, 40, 170), "orange": (245, 130, 20),
}
QUESTIONS = {
    "shape": "What shape is shown in the image?",
    "colour": "What colour is the shape in the image?",
}
SIZE = 112


def draw(shape: str, colour: str, rng: random.Random, size: int = SIZE):
    """One PIL image: a filled shape of one colour at a random place and scale on a light background."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size * 9 // 25)
    jitter = size // 8
    cx, cy = size // 2 + rng.randint(-jitter, jitter), size // 2 + rng.randint(-jitter, jitter)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = max(3, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def encode(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def rows(n: int = 160, seed: int = 0, n_options: int = 4):
    """MCQ rows in VLMEvalKit's columns; the answer's position is shuffled per row."""
    return [row for row, _shape, _colour in items(n, seed, n_options)]


def items(n: int = 160, seed: int = 0, n_options: int = 4):
    """(row, shape drawn, colour drawn) triples: rows with the truth behind both questions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = "shape" if i % 2 == 0 else "colour"
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        truth = shape if kind == "shape" else colour
        pool = [x for x in (SHAPES if kind == "shape" else list(COLOURS)) if x != truth]
        options = rng.sample(pool, n_options - 1) + [truth]
        rng.shuffle(options)
        letters = string.ascii_uppercase[:n_options]
        row = {"index": i, "image": encode(draw(shape, colour, rng)), "question": QUESTIONS[kind]}
        row.update(dict(zip(letters, options)))
        row.update(answer=letters[options.index(truth)], category=kind, split="dev")
        out.append((row, shape, colour))
    return out


def yn_rows(n: int = 160, seed: int = 0):
    """Yes/No rows, half of each answer: "Is the shape in the image red?" or "... a circle?"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        yes = i % 4 < 2
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if i % 2 == 0:
            colour = "red" if yes else rng.choice([c for c in COLOURS if c != "red"])
            question, category = "Is the shape in the image red?", "colour"
        else:
            shape = "circle" if yes else rng.choice([s for s in SHAPES if s != "circle"])
            question, category = "Is the shape in the image a circle?", "shape"
        out.append({"index": i, "image": encode(draw(shape, colour, rng)), "question": question,
                    "answer": "Yes" if yes else "No", "category": category})
    return out


ANNOTATORS = 10


def vqa_rows(n: int = 160, seed: int = 0):
    """Open-answer rows: the drawn shape or colour, in one word. The answer column holds ten
    annotators' answers, as TextVQA's does: VLMEvalKit's default VQA score counts a prediction
    correct when at least three of the other annotators gave it, so a single answer never scores."""
    return [{"index": row["index"], "image": row["image"], "question": row["question"],
             "answer": str([shape if row["category"] == "shape" else colour] * ANNOTATORS),
             "category": row["category"]}
            for row, shape, colour in items(n, seed)]


def first_answer(answer: str) -> str:
    """The answer a row's first annotator gave (a VQA row's list, or the answer itself)."""
    import ast

    try:
        value = ast.literal_eval(answer)
    except (ValueError, SyntaxError):
        return answer
    return str(value[0]) if isinstance(value, list) and value else answer


def multi_rows(n: int = 160, seed: int = 0):
    """Multiple choice over 2 or 3 images: one shows a circle, the others other shapes, each in its
    own colour. "Which colour is the circle?", the options being the images' colours: the answer is
    in one image, and every wrong option is another image's colour."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 2 + i % 2
        shapes = ["circle"] + rng.sample([s for s in SHAPES if s != "circle"], k - 1)
        rng.shuffle(shapes)
        colours = rng.sample(list(COLOURS), k)
        images = [encode(draw(s, c, rng)) for s, c in zip(shapes, colours)]
        options = colours[:]
        rng.shuffle(options)
        row = {"index": i, "image": str(images), "question": "Which colour is the circle?"}
        row.update({string.ascii_uppercase[j]: c for j, c in enumerate(options)})
        answer = string.ascii_uppercase[options.index(colours[shapes.index("circle")])]
        row.update(answer=answer, category=f"{k} images", split="dev")
        out.append(row)
    return out


# name -> (VLMEvalKit kind, rows); None: VLMEvalKit picks the class itself (a custom MCQ set).
SETS = {NAME: (None, rows), YN: ("yorn", yn_rows), VQA: ("vqa", vqa_rows), MULTI: ("mcq", multi_rows)}


def is_sample(name: str) -> bool:
    from . import photos

    return name in SETS or photos.is_photo_set(name)


def kind_of(name: str) -> str | None:
    return SETS[name][0] if name in SETS else None


def write_tsv(path: Path, data: list[dict]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tsv.tmp")
    pd.DataFrame(data).to_csv(tmp, sep="\t", index=False)
    # VLMEvalKit decodes each image once into images/<name>/ and never checks it again: images of
    # an older version of the set would be shown with the new questions.
    shutil.rmtree(path.parent / "images" / path.stem, ignore_errors=True)
    os.replace(tmp, path)
    return path


def ensure(name: str, root: Path) -> Path:
    """Write the sample TSV into `root` (VLMEvalKit's `$LMUData`), or rewrite it if an older version
    of the set is there."""
    import pandas as pd

    from . import photos

    if photos.is_photo_set(name):
        return photos.ensure(name, root)
    path = root / f"{name}.tsv"
    data = SETS[name][1]()
    if not path.exists() or path.read_text() != pd.DataFrame(data).to_csv(sep="\t", index=False):
        write_tsv(path, data)
    decoded = path.parent / "images" / name
    if decoded.is_dir() and any(f.stat().st_mtime < path.stat().st_mtime for f in decoded.iterdir()):
        shutil.rmtree(decoded, ignore_errors=True)   # decoded from an older TSV by an older version
    return path


def corpus() -> list[str]:
    """Text a tiny tokenizer is trained on: the sample's words plus VLMEvalKit's prompt phrasing."""
    words = list(SHAPES) + list(COLOURS) + list(QUESTIONS.values())
    phrases = [
        "Question: ", "Options:\n", "Hint: ", "Answer: ", "Please select the correct answer from the options above.",
        "Answer with the option's letter from the given choices directly.",
        "Please answer yes or no.", "Please try to answer the question with short words or phrases if possible.",
        "You are a helpful assistant.", "system", "user", "assistant", "model", "The answer is",
    ]
    letters = [f"{c}. {w}\n" for c in string.ascii_uppercase[:6] for w in words[:10]]
    return (words + phrases + letters) * 20 + list(string.printable)
