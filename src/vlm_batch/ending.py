"""How a run ends: completed, interrupted (Ctrl-C, or the SIGTERM and SIGHUP that schedulers, `timeout`
and closed terminals send, handled alike), or failed and why; said in the suite report and in the exit
status, so a batch script can tell."""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A signal that ends the run as Ctrl-C does: engines stopped, every answer kept, a rerun resumes."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped in the main thread; a second one is ignored, so it cannot cut
    the cleanup the first one started short."""
    def stop(signum, frame):
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in SIGNALS:
        signal.signal(sig, stop)
    global _forks_reset
    if not _forks_reset:   # once: a second run in this process must not stack another hook
        _forks_reset = True
        os.register_at_fork(after_in_child=_defaults)


_forks_reset = False


def _defaults() -> None:
    """A process forked from ours (VLMEvalKit's scoring pools, our preparation workers) is not the run:
    SIGTERM ends it at once, as it expects. With our handler it raised Stopped wherever it stood, and
    a pool worker stopped while waiting on its queue's lock hung the pool's shutdown, and the run."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def signal_of(exc: BaseException) -> signal.Signals:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT))


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended: 130, 143, 129."""
    return 128 + signal_of(exc)


def ended(exc: BaseException | None, failed_models: list | None = None, models: int = 0) -> dict:
    """The suite report's `ended`: how the run ended and why."""
    if isinstance(exc, KeyboardInterrupt):
        return {"status": "interrupted", "signal": signal_of(exc).name}
    if exc is not None:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    out = {"status": "failed" if failed_models and len(failed_models) == models else "completed"}
    if failed_models:
        out["failed_models"] = {m["model"]: m["error"] for m in failed_models}
    return out
