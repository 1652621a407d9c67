"""One `vllm serve` child for a judge model, on 127.0.0.1: started, waited for, stopped.

The server runs under a guard process (the leader of its own process group, `engines.guard`) that
stops the whole group when this process disappears, so a crash or `kill -9` leaves no server behind;
a normal exit, an exception or Ctrl-C stop it through `close`, and `atexit` covers what those miss.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..engines.environment import gpus_visible, vllm_env
from . import JudgeError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def server_args(model: str, served_name: str, port: int, *, trust_remote_code: bool = False,
                extra: list[str] | None = None) -> list[str]:
    """`vllm serve`'s arguments, through its module entry point (works for the CPU and GPU packages)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if not gpus_visible():
        args += ["--dtype", "float32", "--enforce-eager"]
    if trust_remote_code:
        args.append("--trust-remote-code")
    return args + list(extra or [])


class JudgeServer:
    """One `vllm serve` child for a judge model, on 127.0.0.1: started, waited for, stopped."""

    def __init__(self, model: str, *, served_name: str | None = None, start_timeout: float = 900,
                 trust_remote_code: bool = False, extra_args: list[str] | None = None, log_dir: str | None = None):
        self.model, self.served_name = model, served_name or Path(model).name or model
        self.start_timeout, self.trust_remote_code, self.extra_args = start_timeout, trust_remote_code, extra_args
        self.log_dir = log_dir
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.started_s: float | None = None     # from the spawn to the first answer
        self.stopped = False                     # by `close`, not by dying
        self.proc_returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The vLLM server's own process (the guard's child)."""
        try:
            return int(Path(self.log_path + ".pid").read_text())
        except (OSError, ValueError, TypeError):
            return None

    def start(self) -> "JudgeServer":
        self.port = free_port()
        fd, self.log_path = tempfile.mkstemp(prefix=f"vlm-batch-judge-{self.port}-", suffix=".log",
                                             dir=self.log_dir)
        argv = server_args(self.model, self.served_name, self.port, trust_remote_code=self.trust_remote_code,
                           extra=self.extra_args)
        guard = [sys.executable, "-m", "vlm_batch.engines.guard", str(os.getpid()), self.log_path + ".pid", "--",
                 *argv]
        began = time.time()
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(guard, env={**os.environ, **vllm_env("INFO")}, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.close)
        log.info("judge: starting vLLM's server for %s on %s (log: %s)", self.model, self.base_url, self.log_path)
        try:
            self._wait_ready(began)
        except BaseException:
            self.close()
            raise
        self.started_s = time.time() - began
        log.info("judge: %s answers on %s after %.1fs", self.served_name, self.base_url, self.started_s)
        return self

    def _wait_ready(self, began: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise JudgeError(f"the judge server for {self.model} exited with status {self.proc.returncode} "
                                 f"before it answered: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.time() - began > self.start_timeout:
                raise JudgeError(f"the judge server for {self.model} did not answer within {self.start_timeout:.0f}s: "
                                 f"{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's log that say something (its error, usually), on one line."""
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except (OSError, TypeError):
            return "(no log)"
        useful = [line.strip() for line in text if line.strip() and not line.startswith(" ")]
        return " | ".join(useful[-lines:]) + f" (full log: {self.log_path})"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the guard, the server and everything they started (one process group); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.stopped = True
        atexit.unregister(self.close)
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
                time.sleep(0.1)
            if not _group_alive(proc.pid):
                break
        proc.poll()
        self.proc_returncode = proc.returncode
        log.info("judge: server on port %s stopped", self.port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

