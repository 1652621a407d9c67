"""The tiny models of every family, as cards served by that family's plugin (installed with the tests only)."""

from vlm_batch import hookimpl


@hookimpl
def vlm_batch_models():
    return []
