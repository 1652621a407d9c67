"""The sample set: reproducible from its seed, and never shown with another version's images."""

from vlm_batch.demo import sample_data
from vlm_batch.vlmeval import lmudata_root


def test_same_seed_same_rows_and_answers_are_options():
    first, again = sample_data.items(12, seed=5), sample_data.items(12, seed=5)
    assert [r for r, _, _ in first] == [r for r, _, _ in again]
    for row, shape, colour in first:
        assert row[row["answer"]] == (shape if row["category"] == "shape" else colour)


def _decoded_by_vlmevalkit(tmp_path, monkeypatch):
    """The sample set in a fresh `$LMUData`, and one image as VLMEvalKit leaves it decoded beside it."""
    monkeypatch.setenv("LMUData", str(tmp_path))
    path = sample_data.ensure(sample_data.NAME, lmudata_root())
    decoded = tmp_path / "images" / path.stem
    decoded.mkdir(parents=True)
    (decoded / "0.jpg").write_bytes(b"a decoded image")
    return path, decoded


def test_rewriting_the_set_drops_images_vlmevalkit_decoded_from_the_old_one(tmp_path, monkeypatch):
    path, decoded = _decoded_by_vlmevalkit(tmp_path, monkeypatch)
    sample_data.ensure(sample_data.NAME, lmudata_root())                                  # unchanged set: VLMEvalKit's cache stays
    assert (decoded / "0.jpg").exists()
    path.write_text(path.read_text().replace("circle", "oval"))   # an older version of the set
    sample_data.ensure(sample_data.NAME, lmudata_root())
    assert not decoded.exists() and "oval" not in path.read_text()


def test_images_decoded_before_the_tsv_was_written_are_dropped(tmp_path, monkeypatch):
    import os

    path, decoded = _decoded_by_vlmevalkit(tmp_path, monkeypatch)
    os.utime(decoded / "0.jpg", (path.stat().st_mtime - 60,) * 2)
    sample_data.ensure(sample_data.NAME, lmudata_root())
    assert not decoded.exists()
