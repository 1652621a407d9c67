"""Rank shards, as `torchrun` starts them: each rank answers VLMEvalKit's stride of rows on its own GPUs.

Rank r of w takes rows `range(r, len(data), w)` (VLMEvalKit's split), journals them in its own file,
writes VLMEvalKit's rank file `{r}{w}_{dataset}.pkl` when done, and says so through the launcher's
key-value store; rank 0 waits for every rank, merges the rank files into the prediction file,
evaluates and removes the run's state, as `infer_data_job` does after its barrier.

Synchronisation uses torch.distributed's store (the `env://` rendezvous torchrun provides), not a
process group: a default process group in this process could be picked up by an engine that runs
its workers in-process, and a store also carries each rank's summary and errors to rank 0, so a
failed rank ends the wait with its cause instead of a barrier timeout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

# Set by torchrun (and torch.distributed.launch); hidden from engines and VLMEvalKit during a run, so
# they see one process on its own devices (VLMEvalKit hides WORLD_SIZE from models for this reason).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE")
TIMEOUT_ENV = "VLM_BATCH_RANK_TIMEOUT_S"
WAIT_S = 7 * 24 * 3600       # ranks finish at different times; a long run may take days
CONNECT_S = 1800             # all ranks must have started within this of each other
POLL_S = 0.5


class RankError(RuntimeError):
    """Another rank failed, or the ranks could not meet."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "Ranks":
        """The launcher's RANK / WORLD_SIZE / LOCAL_RANK; one process when they are not set."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE") or 1)
        if world <= 1:
            return cls()
        if "RANK" not in env:
            raise RankError("WORLD_SIZE is set but RANK is not: start ranks with torchrun")
        rank = int(env["RANK"])
        if "LOCAL_RANK" in env:
            local = int(env["LOCAL_RANK"])
        elif env.get("LOCAL_WORLD_SIZE"):
            local = rank % int(env["LOCAL_WORLD_SIZE"])
        else:
            local = rank
        if not 0 <= rank < world:
            raise RankError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def positions(self, n: int) -> range:
        """The rows this rank answers: VLMEvalKit's stride."""
        return range(self.rank, n, self.world_size)

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def device_list(local_rank: int, tp: int = 1, visible: str | None = None) -> str:
    """The `tp` consecutive GPUs of this local rank, as CUDA_VISIBLE_DEVICES should name them.

    With CUDA_VISIBLE_DEVICES already set (a scheduler's share of the node), ranks divide that list,
    unless it holds exactly `tp` devices: then the launcher has given each process its own already.
    Otherwise devices are numbered from 0.
    """
    if tp < 1:
        raise ValueError("tp must be at least 1")
    first = local_rank * tp
    if visible is None or not visible.strip():
        return ",".join(str(first + i) for i in range(tp))
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if len(devices) == tp:
        return ",".join(devices)
    if first + tp > len(devices):
        raise RankError(f"local rank {local_rank} needs GPUs {first}..{first + tp - 1} of "
                        f"CUDA_VISIBLE_DEVICES={visible} ({len(devices)} GPUs): start fewer ranks per node "
                        "or lower --tp")
    return ",".join(devices[first:first + tp])


def assign_devices(ranks: Ranks, tp: int = 1, env=None) -> str | None:
    """Give this rank only its own GPUs. Call before anything initialises CUDA or an engine."""
    env = os.environ if env is None else env
    if not ranks.distributed:
        return None
    env["CUDA_VISIBLE_DEVICES"] = device_list(ranks.local_rank, tp, env.get("CUDA_VISIBLE_DEVICES"))
    return env["CUDA_VISIBLE_DEVICES"]


class Group:
    """The ranks of one run, meeting through the launcher's store. A no-op for a single process."""

    def __init__(self, ranks: Ranks, store=None):
        """`store`: a torch.distributed Store the ranks already share; by default, torchrun's (env://)."""
        self.ranks = ranks
        self.store = None
        self._given = store
        self._hidden: dict = {}

    def __enter__(self) -> "Group":
        if not self.ranks.distributed:
            return self
        if self._given is not None:
            self.store = self._given
            return self
        from datetime import timedelta

        import torch.distributed as dist

        try:
            store, _rank, _world = next(dist.rendezvous("env://", rank=self.ranks.rank,
                                                        world_size=self.ranks.world_size,
                                                        timeout=timedelta(seconds=CONNECT_S)))
        except Exception as exc:
            raise RankError(f"{self.ranks} could not reach the other ranks (MASTER_ADDR="
                            f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                            f"{type(exc).__name__}: {exc}") from exc
        # A restarted torchrun attempt reuses the agent's store: keep each attempt's keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"vlm-batch/{attempt}/", store)
        self._hidden = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
        return self

    def __exit__(self, *exc) -> None:
        os.environ.update(self._hidden)
        self._hidden = {}
        self.store = None

    # -- messages ----------------------------------------------------------------------------------

    def announce(self, step: str, payload: dict | None = None, error: BaseException | str | None = None) -> None:
        """This rank finished `step` (with what it has to say), or failed in it."""
        if self.store is None:
            return
        message = {"error": error if isinstance(error, str) or error is None
                   else f"{type(error).__name__}: {error}", **(payload or {})}
        try:
            self.store.set(f"{step}/{self.ranks.rank}", json.dumps(message, default=str))
        except Exception as exc:
            if error is None:
                raise RankError(f"{self.ranks}: lost contact with the other ranks: {exc}") from exc
            # Already failing: the others learn of it from their own lost contact.

    def wait(self, step: str, ranks=None, timeout: float | None = None) -> list[dict]:
        """Each rank's message for `step`, once all have sent one; RankError naming a rank that failed."""
        if self.store is None:
            return []
        ranks = list(range(self.ranks.world_size) if ranks is None else ranks)
        limit = timeout or float(os.environ.get(TIMEOUT_ENV) or WAIT_S)
        deadline = time.monotonic() + limit
        keys = {r: f"{step}/{r}" for r in ranks}
        messages: dict[int, dict] = {}
        failed = {r: f"failed/{r}" for r in range(self.ranks.world_size) if r != self.ranks.rank}
        while True:
            for r, key in failed.items():   # a rank that failed anywhere ends every wait
                try:
                    if self.store.check([key]):
                        raise RankError(f"rank {r} failed: {json.loads(self.store.get(key)).get('error')}")
                except RankError:
                    raise
                except Exception:
                    break   # the store is gone: said below
            for r, key in keys.items():
                if r in messages:
                    continue
                try:
                    if not self.store.check([key]):
                        continue
                    messages[r] = json.loads(self.store.get(key))
                except Exception as exc:   # rank 0 holds the store: its process is gone
                    raise RankError(f"{self.ranks}: lost contact with rank 0 while waiting for '{step}' "
                                    f"({type(exc).__name__}: {exc}); finished items are saved, rerun to "
                                    "resume") from exc
                if messages[r].get("error"):
                    raise RankError(f"rank {r} failed: {messages[r]['error']}")
            if len(messages) == len(keys):
                return [messages[r] for r in ranks]
            if time.monotonic() > deadline:
                missing = sorted(set(keys) - set(messages))
                raise RankError(f"{self.ranks}: ranks {missing} did not finish '{step}' within {limit:.0f}s "
                                f"(set {TIMEOUT_ENV} to wait longer); finished items are saved, rerun to resume")
            time.sleep(POLL_S)

    def first(self, step: str, action):
        """`action()` on rank 0, then on the others (e.g. a dataset download only rank 0 should do)."""
        if self.store is None:
            return action()
        if self.ranks.rank == 0:
            try:
                value = action()
            except BaseException as exc:
                self.announce(step, error=exc)
                raise
            self.announce(step)
            return value
        self.wait(step, ranks=[0])
        return action()
