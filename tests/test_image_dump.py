"""VLMEvalKit's image dump, made cheaper, gives the pixels VLMEvalKit's own gives: written at PNG's
fastest level on a first run, and, on a later one, taken from the row's base64 only where the file
on disk was written from this TSV."""

import os

import numpy as np
from PIL import Image

from helpers import write_dataset
from vlm_batch import images
from vlm_batch.demo import photos
from vlm_batch.vlmeval.datasets import load_dataset

ROWS = 3


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _dump(dataset):
    """Each row through VLMEvalKit's prompt building, which dumps its image; the file each names."""
    paths = []
    for i in range(len(dataset.data)):
        message = dataset.build_prompt(dataset.data.iloc[i])
        paths += [part["value"] for part in message if part["type"] == "image"]
    return paths


def test_the_first_dump_writes_vlmevalkits_pixels_and_the_open_reuses_them(lmudata):
    from vlmeval.smp.vlm import decode_base64_to_image

    name = write_dataset(lmudata, "DumpPhotos", photos.rows("VLMBatchPhotos", seed=3, n=ROWS))
    dataset = load_dataset(name)
    paths = _dump(dataset)
    assert len(paths) == ROWS
    for path, b64 in zip(paths, dataset.data["image"]):
        expected = np.asarray(decode_base64_to_image(b64))   # what VLMEvalKit's dump writes
        assert np.array_equal(_pixels(path), expected)
        assert np.array_equal(np.asarray(images.open_rgb(path)), expected)


def test_a_later_run_takes_the_base64_only_for_files_written_from_this_tsv(lmudata):
    name = write_dataset(lmudata, "DumpPhotosWarm", photos.rows("VLMBatchPhotos", seed=4, n=ROWS))
    paths = _dump(load_dataset(name))
    images._written.clear()
    # One file older than the TSV, and not what its row holds (a TSV replaced under the same name):
    # VLMEvalKit reads the file it finds, so the open must give the file's pixels, not the base64's.
    stale = paths[1]
    Image.new("RGB", Image.open(stale).size, (7, 70, 140)).save(stale)
    tsv = lmudata / f"{name}.tsv"
    os.utime(stale, ns=(os.stat(tsv).st_atime_ns, os.stat(tsv).st_mtime_ns - 10**9))

    later = load_dataset(name)
    assert _dump(later) == paths
    assert set(images._written) == {paths[0], paths[2]}   # taken from the base64; the stale one not
    for path in paths:
        assert np.array_equal(np.asarray(images.open_rgb(path)), _pixels(path))
    assert (_pixels(stale) == (7, 70, 140)).all()
