"""Everything that touches VLMEvalKit: datasets, the prompt it would send, its files, its scoring.

We call VLMEvalKit's own code rather than restating it, so prompts and files match it by
construction; this module only decides which of its pieces to call, as `infer_data` does.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import os.path as osp
import warnings

from . import sample_data
from .request import item_key

DEFAULT_JUDGE = "exact_matching"
MAX_WORLD_SIZE = 64


class DatasetError(ValueError):
    pass


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


def _quiet_import():
    """VLMEvalKit logs an error when it finds no .env file; that is normal for us."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            import vlmeval.dataset  # noqa: F401
        finally:
            logging.disable(previous)


class UnknownDataset(DatasetError):
    pass


def unknown_datasets_message(names: list[str]) -> str:
    examples = ", ".join(["MMBench_DEV_EN", "MME", "AI2D_TEST", "POPE", sample_data.NAME])
    root = sample_data.lmudata_root()
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
    tsv = sample_data.lmudata_root() / f"{name}.tsv"
    if tsv.exists():
        check_columns(name, tsv)
        if kind:
            check_kind(name, tsv, kind)
        return
    if kind:
        raise DatasetError(f"--kind {kind} makes a local TSV a dataset of that kind, and there is no {tsv}")
    _quiet_import()
    from vlmeval.dataset import SUPPORTED_DATASETS

    if name not in SUPPORTED_DATASETS:
        raise UnknownDataset(unknown_datasets_message([name]))


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


def load_dataset(name: str, limit: int | None = None, kind: str | None = None):
    """VLMEvalKit's dataset object for `name`, offline from `$LMUData/<name>.tsv` when present."""
    check_dataset(name, kind)
    if sample_data.is_sample(name):
        sample_data.ensure(name)
        kind = kind or sample_data.kind_of(name)
    _quiet_import()
    from vlmeval.dataset import build_dataset

    if kind:
        register(name, kind)

    tsv = sample_data.lmudata_root() / f"{name}.tsv"
    bad: dict = {}
    try:
        with warnings.catch_warnings(), rows_set_aside(bad):
            warnings.simplefilter("ignore")
            dataset = build_dataset(name)
    except Exception as exc:
        raise DatasetError(f"Could not load dataset '{name}': {type(exc).__name__}: {exc}") from exc
    if dataset is None:
        raise DatasetError(f"Could not load dataset '{name}' from {tsv}: VLMEvalKit rejected the file "
                           "(it needs at least a `question` column)")
    dataset.bad_rows = bad   # each fails alone, when its prompt is built
    if limit:
        dataset.data = dataset.data.iloc[:limit]
    return dataset


def vlmeval_entry(model_name: str):
    """VLMEvalKit's `supported_VLM` entry for this name: usually a partial of its class and arguments."""
    import vlmeval.config

    return vlmeval.config.supported_VLM.get(model_name)


@functools.lru_cache(maxsize=None)
def _vlmeval_class(model_name: str):
    entry = vlmeval_entry(model_name)
    return getattr(entry, "func", entry)


def prompt_model(card, dataset):
    """VLMEvalKit's own model class for this card, with only what its prompt methods read.

    Its constructor would load weights; the prompt methods need just the attributes the plugin
    lists in `card.prompt_attrs` (a parity test checks them against the real constructor).
    """
    cls = _vlmeval_class(card.prompt_name)
    if cls is None:
        return None
    from vlmeval.vlm.base import BaseModel

    model = object.__new__(cls)
    BaseModel.__init__(model)
    model.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in card.prompt_attrs.items()})
    model.set_dump_image(dataset.dump_image)
    return model


def prompt_builder(card, dataset):
    """The message-building function `infer_data` would use for this model and dataset."""
    if getattr(dataset, "force_use_dataset_prompt", False):
        return _guarded(dataset.build_prompt, dataset)
    model = prompt_model(card, dataset)
    name = dataset.dataset_name
    with warnings.catch_warnings():   # "custom dataset, treated as MCQ" is expected for local TSVs
        warnings.simplefilter("ignore")
        custom = model is not None and model.use_custom_prompt(name)
    return _guarded(functools.partial(model.build_prompt, dataset=name) if custom else dataset.build_prompt,
                    dataset)


class ItemError(ValueError):
    """This row cannot be asked; the cause is in the message."""


# Stands in, while VLMEvalKit loads the file, for an image field it would reject for the whole file.
_PLACEHOLDER = None


def _placeholder() -> str:
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        from PIL import Image

        _PLACEHOLDER = sample_data.encode(Image.new("RGB", (8, 8)))
    return _PLACEHOLDER


def bad_image_fields(data) -> dict:
    """Rows whose image field VLMEvalKit's loader would reject for the whole file, with the cause.

    An image field of 64 characters or fewer is, to VLMEvalKit, the index of another row whose image
    it shares (it asserts, with no message, that the row exists); a field in brackets is a list it
    reads with `eval`, which must not run code from a data file; an empty field drops the row.
    """
    import ast

    import pandas as pd

    images = {str(i): v for i, v in zip(data["index"], data["image"])}
    bad = {}
    for index, value in images.items():
        text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()
        if not text or text == "nan":
            bad[index] = "its image field is empty"
        elif text.startswith("[") and text.endswith("]"):
            try:
                parts = ast.literal_eval(text)
                ok = isinstance(parts, list) and parts and all(isinstance(p, str) and len(p) > 64 for p in parts)
            except (ValueError, SyntaxError):
                ok = False
            if not ok:
                bad[index] = "its image field is not a list of base64 images"
        elif len(text) <= 64:
            target = images.get(text)
            if target is None or len(str(target).strip()) <= 64:
                bad[index] = (f"its image field ({text[:20]!r}) is neither base64 nor the index of a row that "
                              "has an image")
    return bad


@contextlib.contextmanager
def rows_set_aside(bad: dict):
    """While VLMEvalKit loads a TSV, rows it would reject for the whole file get a placeholder
    image; `bad` gets their indices and causes, and those rows fail alone."""
    from vlmeval.dataset.image_base import ImageBaseDataset

    original = ImageBaseDataset.__init__

    def checked(load):
        def load_data(dataset):
            data = load(dataset)
            if "image" in data and "index" in data:
                found = bad_image_fields(data)
                if found:
                    data = data.copy()
                    data["image"] = [_placeholder() if str(i) in found else v
                                     for i, v in zip(data["index"], data["image"])]
                    bad.update({item_key(i): c for i, c in found.items()})
            return data
        return load_data

    def __init__(self, *args, **kwargs):   # every image dataset class loads its file through here
        self.load_data = checked(self.load_data)
        try:
            original(self, *args, **kwargs)
        finally:
            self.__dict__.pop("load_data", None)

    ImageBaseDataset.__init__ = __init__
    try:
        yield bad
    finally:
        ImageBaseDataset.__init__ = original


def _guarded(build, dataset):
    """`build` with clear per-row errors, and odd-but-valid images converted where VLMEvalKit fails.

    VLMEvalKit writes each base64 image to a PNG under `$LMUData/images` before prompting; modes
    PNG cannot hold (CMYK) make that fail. We then write the file ourselves, as RGB, at the path
    VLMEvalKit uses, and build again: the prompt stays exactly VLMEvalKit's.
    """
    bad = getattr(dataset, "bad_rows", {})

    def build_row(line):
        if bad and item_key(line["index"]) in bad:
            raise ItemError(bad[item_key(line["index"])])
        question = line.get("question") if hasattr(line, "get") else None
        if "question" in line and (question is None or str(question).strip() in ("", "nan")):
            raise ItemError("empty question")
        try:
            return build(line)
        except Exception as first:
            if not _write_images(dataset, line):
                raise ItemError(f"could not build the prompt: {type(first).__name__}: {first}") from first
            return build(line)

    return build_row


def _image_targets(dataset, line) -> list[tuple[str, str]]:
    """(base64, file path) pairs where VLMEvalKit's `dump_image` puts this row's images."""
    images, names = line.get("image"), line.get("image_path")
    if not isinstance(images, (list, str)) or not images:
        return []
    if isinstance(images, str):
        images = [images]
        names = [names] if isinstance(names, str) else [f"{line['index']}.png"]
    elif not isinstance(names, list):
        names = [f"{line['index']}_{i}.png" for i in range(len(images))]
    return [(b64, osp.join(dataset.img_root, name)) for b64, name in zip(images, names)]


def _write_images(dataset, line) -> bool:
    """Decode the row's base64 images our way (raising a clear ImageError) and save them as RGB PNGs."""
    from .images import decode_base64

    targets = _image_targets(dataset, line)
    for b64, path in targets:
        picture = decode_base64(b64)
        os.makedirs(osp.dirname(path), exist_ok=True)
        picture.save(path, format="PNG")
    return bool(targets)


def pred_root(work_dir: str, model_name: str) -> str:
    return osp.join(work_dir, model_name)


def vlmeval_state_files(work_dir: str, model_name: str, dataset_name: str) -> list[str]:
    """The pickles VLMEvalKit's `infer_data_job` leaves mid-run, at exactly its own paths."""
    root = pred_root(work_dir, model_name)
    paths = [osp.join(root, f"{model_name}_{dataset_name}_PREV.pkl")]
    paths += [osp.join(root, f"{rank}{world}_{dataset_name}.pkl")
              for world in range(1, MAX_WORLD_SIZE + 1) for rank in range(world)]
    return [p for p in paths if osp.exists(p)]


def rank_file(work_dir: str, model_name: str, dataset_name: str, rank: int, world_size: int) -> str:
    """VLMEvalKit's state file of one rank, `{rank}{world_size}_{dataset}.pkl`, as `infer_data_job` names it."""
    return osp.join(pred_root(work_dir, model_name), f"{rank}{world_size}_{dataset_name}.pkl")


def write_rank_file(dataset, positions, predictions: dict, path: str) -> str:
    """This rank's rows as VLMEvalKit's `infer_data` leaves them: a pickled {index: prediction}."""
    import pickle

    from .journal import key

    rows = dataset.data.iloc[list(positions)]
    answers = {index: str(predictions[key(index)]) for index in rows["index"]}
    os.makedirs(osp.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as fh:
        pickle.dump(answers, fh)
    os.replace(tmp, path)
    return path


def merge_rank_files(dataset, work_dir: str, model_name: str, world_size: int) -> dict:
    """Every rank's answers, as rank 0 of `infer_data_job` gathers them; a missing rank or row is named."""
    import pickle

    from .journal import key

    merged = {}
    for rank in range(world_size):
        path = rank_file(work_dir, model_name, dataset.dataset_name, rank, world_size)
        if not osp.exists(path):
            raise DatasetError(f"rank {rank} of {world_size} left no predictions ({path} is missing)")
        with open(path, "rb") as fh:   # written by a rank of this run, under the user's work dir
            merged.update({key(k): v for k, v in pickle.load(fh).items()})
    missing = [i for i in dataset.data["index"] if key(i) not in merged]
    if missing:
        owners = {key(i): p % world_size for p, i in enumerate(dataset.data["index"])}
        raise DatasetError(f"no prediction for items {missing[:10]} (ranks "
                           f"{sorted({owners[key(i)] for i in missing})} of {world_size})")
    return merged


def previous_predictions(work_dir: str, model_name: str, dataset_name: str) -> dict:
    """Predictions an earlier run left: the final file, then VLMEvalKit's pickles; failures excluded."""
    import pickle

    from .journal import key
    from .request import FAIL_MSG

    found = {}
    final = prediction_file(work_dir, model_name, dataset_name)
    if osp.exists(final):
        from vlmeval.smp import load

        data = load(final)
        found.update(zip(data["index"], data["prediction"]))
    for path in vlmeval_state_files(work_dir, model_name, dataset_name):
        with open(path, "rb") as fh:   # VLMEvalKit's own state file, under the user's work dir
            found.update(pickle.load(fh))
    return {key(k): v for k, v in found.items() if FAIL_MSG not in str(v)}


def prediction_file(work_dir: str, model_name: str, dataset_name: str) -> str:
    """Where VLMEvalKit's run.py puts predictions: `{work_dir}/{model}/{model}_{dataset}.xlsx`, or
    the format `PRED_FORMAT` names. VLMEvalKit's `get_pred_file_path`, without importing VLMEvalKit
    (a rerun decides what is finished before anything heavy loads; a test checks both agree)."""
    fmt = os.environ.get("PRED_FORMAT", "").lower() or "xlsx"
    if fmt not in ("xlsx", "tsv", "json"):
        raise DatasetError(f"PRED_FORMAT={fmt} is not one VLMEvalKit writes (xlsx, tsv or json)")
    return osp.join(work_dir, model_name, f"{model_name}_{dataset_name}.{fmt}")


def write_predictions(dataset, predictions: dict, path: str) -> bool:
    """The dataset's columns minus `image`, plus `prediction`, as `infer_data_job` writes them.

    Returns whether the predictions differ from the file already there; if not, the file is left
    untouched. When they do, VLMEvalKit's intermediate scoring files of the old predictions
    (`_auxmatch`, `_result`, judge caches, ...) are removed: its `evaluate` reuses them when present
    and would score the old answers.
    """
    from vlmeval.smp import dump

    from .journal import key

    data = dataset.data.copy()
    predictions = {key(k): v for k, v in predictions.items()}
    missing = [i for i in data["index"] if key(i) not in predictions]
    if missing:
        raise KeyError(f"no prediction for items {missing[:10]}")
    data["prediction"] = [str(predictions[key(i)]) for i in data["index"]]
    if "image" in data:
        data.pop("image")
    changed = _predictions_differ(path, data)
    if not changed:   # e.g. a rerun that resumed every answer from this file: leave it as it is
        return False
    os.makedirs(osp.dirname(path), exist_ok=True)
    stem, suffix = osp.splitext(path)
    tmp = f"{stem}.partial{suffix}"   # same format, then an atomic rename: never half a file
    dump(data, tmp)
    with open(tmp, "rb") as fh:       # on disk before we go on: the process may exit without cleanup
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    drop_scoring_files(path)
    return True


def _predictions_differ(path: str, data) -> bool:
    if not osp.exists(path):
        return True
    from vlmeval.smp import load

    from .journal import key

    try:
        old = load(path)
        before = {key(i): str(p) for i, p in zip(old["index"], old["prediction"])}
    except Exception:
        return True
    return before != {key(i): p for i, p in zip(data["index"], data["prediction"])}


def drop_scoring_files(path: str) -> list[str]:
    """VLMEvalKit's files derived from this prediction file (it names them `{model}_{dataset}_*`)."""
    from vlmeval.smp.file import fetch_aux_files

    keep = {osp.abspath(path)}
    gone = []
    for aux in fetch_aux_files(path):
        if osp.abspath(aux) in keep or aux.endswith("_run.json") or not osp.isfile(aux):
            continue
        os.remove(aux)
        gone.append(aux)
    return gone


def scoring_caches(path: str) -> list[str]:
    """VLMEvalKit's judge caches (`.pkl`) beside this prediction file: per item, what its judge said."""
    from vlmeval.smp.file import fetch_aux_files

    return [aux for aux in fetch_aux_files(path) if aux.endswith(".pkl") and osp.isfile(aux)]


def drop_scores(path: str) -> list[str]:
    """VLMEvalKit's score files of this prediction file, not its judge caches: after a scoring that
    did not finish, the caches hold what was judged and the score files must not look final."""
    from vlmeval.smp.file import fetch_aux_files

    gone = []
    for aux in fetch_aux_files(path):
        if osp.abspath(aux) == osp.abspath(path) or aux.endswith(("_run.json", ".pkl")) or not osp.isfile(aux):
            continue
        os.remove(aux)
        gone.append(aux)
    return gone


FALLBACK_WARNING = "will use exact matching"   # VLMEvalKit's words when its judge's working() check fails


class JudgeFellBack(RuntimeError):
    """VLMEvalKit found the judge not working and scored by exact matching instead."""


def evaluate(dataset, path: str, judge: str = DEFAULT_JUDGE, nproc: int = 4, *, strict_judge: bool = False,
             **judge_kwargs):
    """VLMEvalKit's own scoring of the prediction file; `exact_matching` needs no network.

    `judge_kwargs` are VLMEvalKit's judge arguments (`api_base`, `key`, ...). With `strict_judge`, a judge
    VLMEvalKit finds not working is an error (JudgeFellBack) instead of its quiet fall back to exact matching.
    """
    if type(dataset).__name__ == "CustomVQADataset":   # its evaluate raises a bare NotImplementedError
        raise DatasetError(f"VLMEvalKit loads the local TSV '{dataset.dataset_name}' (no options) as its "
                           "CustomVQADataset, which cannot score; name its kind with --kind yorn|vqa|mcq "
                           "(or a config `class`) and rerun with --mode eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dataset.evaluate(path, model=judge, nproc=nproc, **judge_kwargs)
    if judge != DEFAULT_JUDGE and any(FALLBACK_WARNING in str(w.message) for w in caught):
        if strict_judge:
            raise JudgeFellBack(f"VLMEvalKit found the judge {judge} not working and fell back to exact matching")
        import logging

        logging.getLogger(__name__).warning("%s: VLMEvalKit found the judge %s not working (no API key?) and "
                                            "scored by exact matching", dataset.dataset_name, judge)
    return result
