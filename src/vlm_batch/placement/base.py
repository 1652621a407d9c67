"""The placement interface, as one process runs it: every row, one engine, this process writes and
scores. Ranks (`sharded`) and Ray replicas (`ray`) override what differs for them."""

from __future__ import annotations

from .. import state
from .ranks import Ranks
from .stream import answered


class Placement:
    name = "one process"
    ranks = Ranks()
    writer = True        # this process writes the files and scores

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def share(self, n: int):
        return range(n)

    def journal_path(self, work_dir: str, model: str, dataset: str) -> str:
        return state.journal_path(work_dir, model, dataset)

    def first(self, step: str, action):
        """`action` on every process (under ranks: rank 0 first, e.g. a download happens once)."""
        return action()

    def on_writer(self, step: str, action):
        """`action` on the process that writes; the others learn whether it failed."""
        return action()

    def preparer(self, card, datasets: dict, workers: int = 0, fit=None, start=None):
        """Rows to requests; its workers render them for `start`'s engine where they can."""
        from ..prepare import Preparer

        return Preparer(card, datasets, workers, fit, rendering=start.rendering() if start else None)

    def start(self, card, choice, options: dict):
        """The model's engine, starting: the one `choice` (an `engines.choice.Choice`) decided on."""
        from ..engines.start import EngineStart

        return EngineStart(card, choice, options)

    def answer(self, card, start, preparer, work, on_restart=None):
        """Results for `work` ((dataset, position) pairs, in order), as they finish; rows that cannot
        be prepared come back as failed Results."""
        failures: list = []
        yield from answered(card, start, preparer.requests(failures, work), failures=failures,
                            on_restart=on_restart, unrendered=preparer.unrendered)

    def model_failed(self, exc: BaseException) -> None:
        """A model could not run here; one process goes on with the next model."""

    def gather(self, run) -> dict:
        return {k: r.prediction for k, r in run.results.items()}

    def outcome(self, summaries: list) -> list:
        return summaries
