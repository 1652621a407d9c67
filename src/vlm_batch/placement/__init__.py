"""Where a run happens: one process (`base.Placement`), torchrun ranks (`sharded`) or Ray replicas
(`ray`), chosen once by `placement_for`. A placement gives the executor:

- `share(n)`: the rows of a dataset this process answers, and `journal_path` for them;
- `start(...)` / `answer(...)`: an engine, and a stream of work through it (`stream.answered`: one
  restart loop for every placement);
- `gather(run)`: every row's answer, on the process that writes the files (None elsewhere);
- `outcome(summaries)`: the summaries every process prints.

No placement calls back into the executor.
"""

from __future__ import annotations


def placement_for(ranks, ray=None, tp: int = 1):
    """Where this run happens, decided once: Ray replicas, torchrun ranks, or this process."""
    if ray is not None:
        if ranks.distributed:
            from .ranks import RankError

            raise RankError(f"{ranks}: --ray starts its own replicas; run it as one process, not under torchrun")
        from .ray import RayPlacement

        return RayPlacement(ray)
    if ranks.distributed:
        from .sharded import RankPlacement

        return RankPlacement(ranks, tp)
    from .base import Placement

    return Placement()
