"""Rows VLMEvalKit's loader would reject for the whole file: each is set aside to fail alone."""

from __future__ import annotations

import contextlib

from ..request import item_key


class ItemError(ValueError):
    """This row cannot be asked; the cause is in the message."""


# Stands in, while VLMEvalKit loads the file, for an image field it would reject for the whole file.
_PLACEHOLDER = None


def _placeholder() -> str:
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        from PIL import Image

        from ..demo.sample_data import encode

        _PLACEHOLDER = encode(Image.new("RGB", (8, 8)))
    return _PLACEHOLDER


def bad_image_fields(data, skip_noimg: bool = True) -> dict:
    """Rows whose image field VLMEvalKit's loader would reject for the whole file, with the cause.

    A row with no image (an empty field, NaN to pandas) is not one while `skip_noimg` is on
    (`ImageBaseDataset`'s default): VLMEvalKit drops it, and so do we. With it off the row stays, and
    the loader takes its "nan" for the index of another row (below). An image field of 64 characters
    or fewer is, to VLMEvalKit, the index of another row whose image it shares (it asserts, with no
    message, that the row exists and has an image); a field in brackets is a list it reads with
    `eval`, which must not run code from a data file.
    """
    import ast

    import pandas as pd

    def missing(value):
        return value is None or (not isinstance(value, (str, list)) and bool(pd.isna(value)))

    images = {str(i): v for i, v in zip(data["index"], data["image"])}
    kept = {i: v for i, v in images.items() if not (skip_noimg and missing(v))}   # what VLMEvalKit keeps
    bad = {}
    for index, value in kept.items():
        text = "nan" if missing(value) else str(value)   # as VLMEvalKit reads it: str(), unstripped
        if missing(value) or not text.strip():
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
            target = kept.get(text)
            if missing(target) or len(str(target)) <= 64:
                bad[index] = (f"its image field ({text[:20]!r}) is neither base64 nor the index of a row that "
                              "has an image")
    return bad


@contextlib.contextmanager
def rows_set_aside(bad: dict):
    """While VLMEvalKit loads a TSV, rows it would reject for the whole file get a placeholder
    image; `bad` gets their indices and causes, and those rows fail alone. Rows without an image
    are left to the dataset's class: it drops them (`skip_noimg`, on by default) or asks them as
    text-only questions (classes that turn it off and handle such rows themselves)."""
    import inspect

    from vlmeval.dataset.image_base import ImageBaseDataset

    original = ImageBaseDataset.__init__
    signature = inspect.signature(original)

    def checked(load, skip_noimg):
        def load_data(dataset):
            data = load(dataset)
            if "image" in data and "index" in data:
                found = bad_image_fields(data, skip_noimg)
                if found:
                    data = data.copy()
                    data["image"] = [_placeholder() if str(i) in found else v
                                     for i, v in zip(data["index"], data["image"])]
                    bad.update({item_key(i): c for i, c in found.items()})
            return data
        return load_data

    def __init__(self, *args, **kwargs):   # every image dataset class loads its file through here
        try:
            call = signature.bind(self, *args, **kwargs)
            call.apply_defaults()
            skip_noimg = bool(call.arguments.get("skip_noimg", True))
        except TypeError:   # VLMEvalKit's own call will say what is wrong
            skip_noimg = True
        self.load_data = checked(self.load_data, skip_noimg)
        try:
            original(self, *args, **kwargs)
        finally:
            self.__dict__.pop("load_data", None)

    ImageBaseDataset.__init__ = __init__
    try:
        yield bad
    finally:
        ImageBaseDataset.__init__ = original
