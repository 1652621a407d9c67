"""Small synthetic TSVs in the real formats of VLMEvalKit's official datasets, for the parity tests.

Each builder writes rows with the dataset's own columns, index scheme, image references and answer
format (so VLMEvalKit's per-dataset prompt rules and evaluators apply), and drawn shapes for images,
in sizes that make Qwen2-VL's resizing both shrink and grow them. Official names carry an MD5 in
VLMEvalKit: `without_md5` lets a test (never the product) load these files under those names.
"""

from __future__ import annotations

import contextlib
import random
import string

from vlm_batch.demo import sample_data
from vlm_batch.demo.sample_data import COLOURS, SHAPES

# (width, height): square, wide, tall, large (shrunk to the pixel bounds), small (grown).
SIZES = [(112, 112), (200, 120), (64, 300), (500, 400), (40, 40), (150, 90)]


def picture(rng: random.Random, shape: str | None = None, colour: str | None = None) -> str:
    """A drawn shape, base64 PNG, in one of SIZES."""
    shape, colour = shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS))
    image = sample_data.draw(shape, colour, rng).resize(rng.choice(SIZES))
    return sample_data.encode(image)


def _options(rng, truth, pool, n):
    options = rng.sample([x for x in pool if x != truth], n - 1) + [truth]
    rng.shuffle(options)
    return options, string.ascii_uppercase[options.index(truth)]


def _mcq(rng, i, n_options=4):
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if i % 2:
        options, answer = _options(rng, colour, list(COLOURS), n_options)
        question = "What colour is the shape?"
    else:
        options, answer = _options(rng, shape, SHAPES, n_options)
        question = "Which shape is drawn?"
    return picture(rng, shape, colour), question, options, answer


def mmstar(n, rng):
    """Options in the question and in A-D; category / l2_category / bench."""
    rows = []
    for i in range(n):
        image, question, options, answer = _mcq(rng, i)
        listed = ", ".join(f"{k}: {v}" for k, v in zip("ABCD", options))
        rows.append({"index": i, "question": f"{question}\nOptions: {listed}", **dict(zip("ABCD", options)),
                     "answer": answer, "category": ["coarse perception", "instance reasoning"][i % 2],
                     "l2_category": ["image scene and topic", "attribute reasoning"][i % 2],
                     "bench": "SEEDBench_IMG", "meta_info": "", "image": image})
    return rows


def ai2d(n, rng):
    rows = []
    for i in range(n):
        image, question, options, answer = _mcq(rng, i)
        rows.append({"index": i, "image": image, "question": question, **dict(zip("ABCD", options)),
                     "answer": answer})
    return rows


def scienceqa(n, rng):
    """2 to 4 options (the rest empty), a hint on some rows; split val."""
    rows = []
    for i in range(n):
        k = 2 + i % 3
        image, question, options, answer = _mcq(rng, i, k)
        row = {"index": i, "question": question, "hint": "Look at the picture." if i % 2 else float("nan"),
               "answer": answer, "image": image, "category": "natural science", "skill": "Identify shapes",
               "split": "val"}
        row.update({letter: (options[j] if j < k else float("nan")) for j, letter in enumerate("ABCD")})
        rows.append(row)
    return rows


def seedbench(n, rng):
    rows = []
    for i in range(n):
        image, question, options, answer = _mcq(rng, i)
        rows.append({"index": i, "question": question, **dict(zip("ABCD", options)), "answer": answer,
                     "category": ["Instance Identity", "Instance Attributes"][i % 2], "image": image})
    return rows


def mmbench_circular(n, rng):
    """MMBench's circular copies: question i again at i + k * 1e6 with its options rotated by k, the
    copies' image field the index of the first (VLMEvalKit shares the image)."""
    rows, i = [], 0
    while len(rows) < n:
        k_options = 2 + i % 3
        image, question, options, answer = _mcq(rng, i, k_options)
        for k in range(k_options):
            if len(rows) == n:
                break
            rotated = options[k:] + options[:k]
            row = {"index": i + k * 1_000_000, "question": question,
                   "hint": "The shapes are drawn." if i % 2 else float("nan"),
                   "answer": string.ascii_uppercase[rotated.index(options[ord(answer) - 65])],
                   "image": image if k == 0 else str(i), "category": "image_scene",
                   "source": "synthetic", "l2-category": "coarse_perception", "comment": float("nan"),
                   "split": "dev"}
            row.update({letter: (rotated[j] if j < k_options else float("nan")) for j, letter in enumerate("ABCD")})
            rows.append(row)
        i += 1
    return rows


def mme(n, rng):
    """Pairs of questions on one image (the second row refers to the first), answers Yes then No,
    `image_path` named by category (MME's rating pairs rows by it)."""
    rows = []
    categories = ["color", "count", "OCR", "code_reasoning"]
    for i in range(0, n, 2):
        colour = rng.choice(list(COLOURS))
        other = rng.choice([c for c in COLOURS if c != colour])
        category = categories[(i // 2) % len(categories)]
        image = picture(rng, colour=colour)
        for j, (asked, answer) in enumerate(((colour, "Yes"), (other, "No"))[: n - i]):
            rows.append({"index": i + j, "image": image if j == 0 else str(i),
                         "question": f"Is the shape {asked}? Please answer yes or no.", "answer": answer,
                         "category": category, "image_path": f"{category}/{i // 2}.png"})
    return rows


def pope(n, rng):
    rows = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        asked = shape if i % 2 == 0 else rng.choice([s for s in SHAPES if s != shape])
        rows.append({"index": i, "question": f"Is there a {asked} in the image?",
                     "answer": "Yes" if asked == shape else "No",
                     "category": ["adversarial", "popular", "random"][i % 3], "image": picture(rng, shape)})
    return rows


def hallusionbench(n, rng):
    """Indices `<category>_<l2-category>_<visual input>_<set>_<figure>_<question>`; visual input 0 is
    a question with no image (an empty image field), as in HallusionBench."""
    rows = []
    for i in range(n):
        category, l2 = ("VS", "chart") if i % 3 else ("VD", "table")
        visual = 0 if i % 5 == 1 else 1
        shape = rng.choice(SHAPES)
        asked = shape if i % 2 == 0 else rng.choice([s for s in SHAPES if s != shape])
        rows.append({"index": f"{category}_{l2}_{visual}_{i // 4}_{visual}_{i % 4}",
                     "question": f"Is there a {asked} in the picture?", "answer": "Yes" if asked == shape else "No",
                     "category": category, "l2-category": l2,
                     "image": picture(rng, shape) if visual else float("nan")})
    return rows


def mmmu(n, rng, many: int = 5):
    """Interleaved `<image k>` tags, lists of images (`image`, `image_path`), up to 5 options; the
    first row has `many` images."""
    rows = []
    for i in range(n):
        k = many if i == 0 else 1 + i % 3
        shapes = [rng.choice(SHAPES) for _ in range(k)]
        colours = rng.sample(list(COLOURS), k)
        images = [picture(rng, s, c) for s, c in zip(shapes, colours)]
        target = rng.randrange(k)
        tags = " ".join(f"<image {j + 1}>" for j in range(k))
        n_options = 4 + i % 2
        options, answer = _options(rng, colours[target], list(COLOURS), n_options)
        row = {"index": i, "question": f"{tags} What colour is the shape in <image {target + 1}>?",
               "answer": answer, "category": ["Art", "Math"][i % 2], "l2-category": "Shapes",
               "split": ["dev", "validation"][i % 2], "question_type": "multiple-choice",
               "image": str(images) if k > 1 else images[0],
               "image_path": str([f"{i}_{j}.png" for j in range(k)]) if k > 1 else f"{i}.png"}
        row.update({letter: (options[j] if j < n_options else float("nan")) for j, letter in enumerate("ABCDE")})
        rows.append(row)
    return rows


OCRBENCH_CATEGORIES = ["Regular Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
                       "Key Information Extraction"]


def ocrbench(n, rng):
    """Answers are lists (VLMEvalKit evals them); OCRBench's categories."""
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        rows.append({"index": i, "image": picture(rng, shape, colour),
                     "question": "What colour is the shape?" if i % 2 else "What shape is this?",
                     "answer": str([colour if i % 2 else shape]), "category": OCRBENCH_CATEGORIES[i % 4],
                     "dataset": "synthetic"})
    return rows


def textvqa(n, rng):
    """Ten annotators' answers per row, as TextVQA's VQA score needs."""
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        truth = colour if i % 2 else shape
        answers = [truth] * 7 + [rng.choice(SHAPES) for _ in range(3)]
        rows.append({"index": 34602 + i, "question": "what colour is it?" if i % 2 else "what shape is it?",
                     "image": picture(rng, shape, colour), "answer": str(answers)})
    return rows


def chartqa(n, rng):
    """One answer per row, numbers among them (relaxed accuracy); human and augmented splits."""
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        question, answer = (("How many shapes are drawn?", "1") if i % 3 == 0 else
                            ("What colour is the shape?", colour) if i % 3 == 1 else ("Which shape is it?", shape))
        rows.append({"index": i, "image": picture(rng, shape, colour), "question": question, "answer": answer,
                     "split": ["human", "augmented"][i % 2]})
    return rows


def mathvista(n, rng):
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        rows.append({"index": i, "image": picture(rng, shape, colour), "question": "How many shapes are there?",
                     "answer": "1", "question_type": "free_form", "answer_type": "integer", "choices": float("nan"),
                     "unit": float("nan"), "precision": float("nan"), "skills": "['numeric commonsense']",
                     "task": "figure question answering", "source": "synthetic",
                     "query": "Hint: Please answer the question requiring an integer answer.\n"
                              "Question: How many shapes are there?"})
    return rows


# Official name -> (builder, rows)
BUILDERS = {
    "MMStar": (mmstar, 8), "AI2D_TEST": (ai2d, 8), "ScienceQA_VAL": (scienceqa, 8), "SEEDBench_IMG": (seedbench, 8),
    "MMBench_DEV_EN": (mmbench_circular, 9), "MME": (mme, 8), "POPE": (pope, 9), "HallusionBench": (hallusionbench, 12),
    "MMMU_DEV_VAL": (mmmu, 6), "OCRBench": (ocrbench, 8), "TextVQA_VAL": (textvqa, 8), "ChartQA_TEST": (chartqa, 9),
    "MathVista_MINI": (mathvista, 6),
}


def write(root, name: str, n: int | None = None, seed: int = 7) -> str:
    """`$LMUData/<name>.tsv` in the official dataset's format; returns the name."""
    build, default = BUILDERS[name]
    sample_data.write_tsv(root / f"{name}.tsv", build(n or default, random.Random(f"{name}-{seed}")))
    return name


@contextlib.contextmanager
def without_md5(names):
    """VLMEvalKit loads these official names from the local TSVs as they are (no MD5 check, so no
    download): for tests only, which write their own small files under official names."""
    from vlmeval.dataset import DATASET_CLASSES
    from vlmeval.dataset.image_base import ImageBaseDataset

    def family(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from family(sub)

    saved = []
    for cls in {*DATASET_CLASSES, *family(ImageBaseDataset)}:
        table = cls.__dict__.get("DATASET_MD5")
        for name in names:
            if isinstance(table, dict) and name in table:
                saved.append((table, name, table.pop(name)))
    try:
        yield
    finally:
        for table, name, value in saved:
            table[name] = value
