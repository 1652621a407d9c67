"""VLMEvalKit's datasets: names checked before any model loads, local TSVs of a kind, loading."""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import warnings

from ..demo import sample_data
from . import DatasetError, lmudata_root, quiet_import
from .prompts import fast_dump
from .rows import rows_set_aside


def check_columns(name: str, tsv) -> None:
    """Fail fast, before any model loads, when a local TSV lacks what every row needs."""
    if not tsv.exists():
        return
    with open(tsv, encoding="utf-8", errors="replace") as fh:
        columns = {c.strip() for c in fh.readline().rstrip("\n").split("\t")}
    missing = [c for c in ("index", "question") if c not in columns]
    if not {"image", "image_path"} & columns:
        missing.append("image or image_path")
    if missing:
        raise DatasetError(f"Dataset '{name}' ({tsv}) is missing required columns: {', '.join(missing)}")



class UnknownDataset(DatasetError):
    pass


def unknown_datasets_message(names: list[str]) -> str:
    examples = ", ".join(["MMBench_DEV_EN", "MME", "AI2D_TEST", "POPE", sample_data.NAME])
    root = lmudata_root()
    quoted = ", ".join(f"'{n}'" for n in names)
    files = ", ".join(str(root / f"{n}.tsv") for n in names)
    return (f"Unknown dataset{'s' if len(names) > 1 else ''} {quoted}: not one of VLMEvalKit's datasets "
            f"(e.g. {examples}) and no file {files}")


# `--kind` (or a config's `class`): the VLMEvalKit class a local TSV is loaded, prompted and scored as.
KINDS = {"mcq": "ImageMCQDataset", "yorn": "ImageYORNDataset", "vqa": "ImageVQADataset"}


def kind_class(kind: str) -> str:
    """The VLMEvalKit class name for a kind (mcq, yorn, vqa) or a class name given as is."""
    if kind in KINDS:
        return KINDS[kind]
    if kind in KINDS.values():
        return kind
    raise DatasetError(f"Unknown dataset kind '{kind}': one of {', '.join(KINDS)} "
                       f"(or VLMEvalKit's class names {', '.join(KINDS.values())})")


def check_kind(name: str, tsv, kind: str) -> None:
    """What a kind needs of its rows, in one line naming the first offending row."""
    import pandas as pd

    cls = kind_class(kind)
    data = pd.read_csv(tsv, sep="\t", usecols=lambda c: c in ("index", "answer", "A", "B"), dtype=str,
                       keep_default_na=False)
    where = f"Dataset '{name}' ({tsv}), of kind {kind}"
    if "answer" not in data:
        raise DatasetError(f"{where}: has no `answer` column to score against")
    if cls == "ImageMCQDataset" and not {"A", "B"} <= set(data.columns):
        raise DatasetError(f"{where}: needs option columns A and B at least")
    for index, answer in zip(data.get("index", range(len(data))), data["answer"]):
        text = str(answer).strip()
        if not text:
            raise DatasetError(f"{where}: row {index} has an empty answer")
        if cls == "ImageYORNDataset" and text.lower() not in ("yes", "no"):
            raise DatasetError(f"{where}: row {index} has answer {text!r}; a Y/N set's answers are Yes or No")
        if cls == "ImageVQADataset":
            cause = vqa_answer_problem(name, text)
            if cause:
                raise DatasetError(f"{where}: row {index} has answer {text[:60]!r}; {cause}")


# VLMEvalKit's VQA scoring by dataset name; all other names get the VQA score, which needs several
# annotators' answers per row (it counts matches among the *other* annotators').
_SINGLE_ANSWER_SCORING = ("ChartQA", "OCRVQA", "GQA", "DocVQA", "InfoVQA")
_EVALUATED = (ast.Call, ast.Attribute, ast.Subscript, ast.Lambda, ast.NamedExpr, ast.ListComp, ast.SetComp,
              ast.DictComp, ast.GeneratorExp, ast.Starred, ast.Pow)


def vqa_answer_problem(name: str, text: str) -> str | None:
    """Why VLMEvalKit's VQA scoring cannot use this answer, or None.

    VLMEvalKit calls `eval` on every answer to see whether it is a list, so an answer that is a
    Python expression beyond a literal is refused rather than run.
    """
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        tree = None
    if tree is not None and any(isinstance(node, _EVALUATED) for node in ast.walk(tree)):
        return "VLMEvalKit would run it as Python code (it evals VQA answers); give plain text or a list"
    answers = None
    if tree is not None:
        try:
            value = ast.literal_eval(tree)
            answers = value if isinstance(value, list) else None
        except ValueError:
            pass
    if any(scoring in name for scoring in _SINGLE_ANSWER_SCORING):
        return None
    if answers is None or len(answers) < 4:
        return ("VLMEvalKit's VQA score counts a prediction right when 3 of the other annotators gave it, "
                "so each row needs a list of at least 4 answers (as TextVQA's ten), e.g. ['red', 'red', 'red', 'red']")
    return None


def check_dataset(name: str, kind: str | None = None) -> None:
    """Before any model loads: the name exists, and a local TSV has what its rows (and its kind) need.

    A local TSV is checked without importing VLMEvalKit; only a name with no file here needs
    VLMEvalKit's list of datasets.
    """
    if sample_data.is_sample(name):
        return
    tsv = lmudata_root() / f"{name}.tsv"
    if tsv.exists():
        check_columns(name, tsv)
        if kind:
            check_kind(name, tsv, kind)
        return
    if kind:
        raise DatasetError(f"--kind {kind} makes a local TSV a dataset of that kind, and there is no {tsv}")
    quiet_import()
    from vlmeval.dataset import SUPPORTED_DATASETS

    if name not in SUPPORTED_DATASETS:
        raise UnknownDataset(unknown_datasets_message([name]))


def needs_download(name: str) -> bool:
    """Whether loading `name` fetches its TSV (one of VLMEvalKit's datasets with no copy in `$LMUData`):
    a step that can fail, best taken before any engine starts."""
    return not sample_data.is_sample(name) and not (lmudata_root() / f"{name}.tsv").exists()


def register(name: str, kind: str) -> None:
    """Make the local TSV `name` one of VLMEvalKit's datasets of that kind's class: its prompt
    building, the models' custom prompts (they ask VLMEvalKit the dataset's type) and its scoring."""
    import vlmeval.dataset

    cls = getattr(vlmeval.dataset, kind_class(kind))
    for other in vlmeval.dataset.DATASET_CLASSES:
        if other is not cls and name in other.supported_datasets() and not issubclass(other, cls):
            raise DatasetError(f"'{name}' is VLMEvalKit's own {other.__name__} dataset; --kind and `class` "
                               "are for local TSVs of other names")
    cls.DATASET_URL.setdefault(name, "")


@contextlib.contextmanager
def _held(said: list):
    """What VLMEvalKit logs on the root logger while it loads (a download's cause, say) goes into `said`
    instead of the terminal: the error, if any, carries it, so a failure stays one line."""
    def hold(record) -> bool:
        if record.name == "root" and f"{os.sep}vlmeval{os.sep}" in record.pathname:
            said.append(record.getMessage())
            return False
        return True

    handlers = list(logging.root.handlers)
    for handler in handlers:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


def load_dataset(name: str, limit: int | None = None, kind: str | None = None):
    """VLMEvalKit's dataset object for `name`, offline from `$LMUData/<name>.tsv` when present."""
    check_dataset(name, kind)
    if sample_data.is_sample(name):
        sample_data.ensure(name, lmudata_root())
        kind = kind or sample_data.kind_of(name)
    quiet_import()
    from vlmeval.dataset import build_dataset

    if kind:
        register(name, kind)

    tsv = lmudata_root() / f"{name}.tsv"
    bad: dict = {}
    said: list = []
    try:
        with warnings.catch_warnings(), rows_set_aside(bad), _held(said):
            warnings.simplefilter("ignore")
            dataset = build_dataset(name)
    except Exception as exc:
        why = f" ({said[-1]})" if said else ""
        raise DatasetError(f"Could not load dataset '{name}': {type(exc).__name__}: {exc}{why}") from exc
    if dataset is None:
        raise DatasetError(f"Could not load dataset '{name}' from {tsv}: VLMEvalKit rejected the file "
                           "(it needs at least a `question` column)")
    dataset.bad_rows = bad   # each fails alone, when its prompt is built
    fast_dump(dataset)
    if limit:
        dataset.data = dataset.data.iloc[:limit]
    return dataset

