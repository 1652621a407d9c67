"""The message VLMEvalKit would send the model for a row: the dataset's prompt or the model class's own."""

from __future__ import annotations

import functools
import os
import os.path as osp
import warnings

from ..images import written
from ..request import item_key
from .registry import card_class
from .rows import ItemError


def prompt_model(card, dataset):
    """VLMEvalKit's own model class for this card, with only what its prompt methods read.

    Its constructor would load weights; the prompt methods need just the attributes the plugin
    lists in `card.prompt_attrs` (a parity test checks them against the real constructor).
    """
    cls = card_class(card)
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
    from ..images import decode_base64

    targets = _image_targets(dataset, line)
    for b64, path in targets:
        picture = decode_base64(b64)
        os.makedirs(osp.dirname(path), exist_ok=True)
        picture.save(path, format="PNG")
    return bool(targets)



def fast_dump(dataset) -> None:
    """VLMEvalKit's image dump with PNG's fastest compression: the same files at the same paths with the
    same pixels (PNG is lossless; decoded by VLMEvalKit's own function), written 5x faster.

    VLMEvalKit writes each row's base64 image to `{index}.png` at zlib level 6 before building its
    prompt: 250 ms of CPU for a 1024x768 photo, ten times its JPEG decoding, and the largest cost
    of the data path on photo-sized sets (level 1: 50 ms, for a file 10% larger). Files that exist
    are left alone, as VLMEvalKit leaves them; other formats and whatever fails here (modes PNG cannot
    hold) are left to VLMEvalKit's own dump.
    """
    dump = dataset.dump_image
    if getattr(dump, "fast", False):
        return

    def fast(line):
        try:
            _write_pngs(dataset, line)
        except Exception:   # VLMEvalKit's dump, below, meets it and says so
            pass
        return dump(line)

    fast.fast = True
    dataset.dump_image = fast


def _write_pngs(dataset, line) -> None:
    from vlmeval.smp import read_ok
    from vlmeval.smp.vlm import decode_base64_to_image

    for b64, path in _image_targets(dataset, line):
        if not path.lower().endswith(".png"):
            continue
        if read_ok(path):
            _kept(dataset, path, b64)
            continue
        picture = decode_base64_to_image(b64)   # VLMEvalKit's decoding and mode conversion
        os.makedirs(osp.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        picture.save(partial, format="PNG", compress_level=1)
        os.replace(partial, path)   # whole or absent: a file cut short by a crash would be read as an image
        written(path, picture)


def _kept(dataset, path: str, b64: str) -> None:
    """A file an earlier run wrote, from this TSV (written after the TSV was), holds the pixels of the
    row's base64 losslessly: decoding the base64 (a JPEG, 5 ms for a 1024x768 photo) gives them 4x
    cheaper than decoding the PNG (20 ms), for the open that follows. An older file is left to be read
    as VLMEvalKit reads it."""
    from PIL import Image
    from vlmeval.smp import LMUDataRoot
    from vlmeval.smp.vlm import decode_base64_to_image

    tsv = getattr(dataset, "data_path", None) or osp.join(LMUDataRoot(), f"{dataset.dataset_name}.tsv")
    try:
        if os.stat(path).st_mtime_ns < os.stat(tsv).st_mtime_ns:
            return

        picture = decode_base64_to_image(b64)
        with Image.open(path) as on_disk:   # its header only
            if (on_disk.size, on_disk.mode) != (picture.size, picture.mode):
                return
        picture.load()
    except Exception:   # unreadable either way: the open that follows says so
        return
    written(path, picture)


def side_by_side(paths: list[str], height: int):
    """VLMEvalKit's joining of several images into one, side by side at `height` pixels (its models
    that take one image see a multi-image row this way); returns the joined picture's file path."""
    from vlmeval.smp import concat_images_vlmeval

    return concat_images_vlmeval(paths, target_size=height)
