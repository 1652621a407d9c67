"""VLMEvalKit's LLM judge, served locally: a `vllm serve` child on loopback, and how scoring uses it.

VLMEvalKit already talks to any OpenAI-compatible judge (`api_base` in its judge arguments) and sends
it `nproc` requests at a time. So a local judge is only a server: we start vLLM's own OpenAI server
for the model on 127.0.0.1 and a free port, wait until it answers, hand VLMEvalKit its address, and
stop it. Prompts, answer extraction and scores stay VLMEvalKit's.

The server runs under a small guard process (the leader of its own process group) that stops the
whole group when this process disappears, so a crash or `kill -9` leaves no server behind; a normal
exit, an exception or Ctrl-C stop it through `close`, and `atexit` covers what those miss.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

EXACT = "exact_matching"
DEFAULT_NPROC = 64
# Markers VLMEvalKit leaves in its judge caches for an item whose judge call failed (see `forget_failed`).
FAILED_MARKERS = ("Failed to obtain answer via API", "Failed to predict, thus randomly generate one")


class JudgeError(RuntimeError):
    """The judge could not be started or stopped answering; the message says why, in one line."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats


def is_local(name: str | None) -> bool:
    """Whether --judge names a model for us to serve (a vlm-batch model, a path, a hub id `org/name`);
    anything else (gpt-4o-mini, chatgpt-0125, ...) is a judge VLMEvalKit's `build_judge` names."""
    if not name or name == EXACT:
        return False
    from .plugins import get_models

    return name in get_models() or os.path.exists(name) or "/" in name


def resolve(name: str) -> str:
    """The checkpoint vLLM loads for --judge NAME: a card's path, a local folder, or the hub id itself."""
    from .plugins import get_models

    cards = get_models()
    if name in cards:
        return cards[name].path()
    if os.path.exists(name):
        return str(Path(name).resolve())
    return name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(verbose: bool = False) -> dict:
    """The server's environment: ours plus what vLLM needs on this machine (CPU settings off-GPU)."""
    from .engines import on_gpu
    from .engines.vllm import CPU_ENV, QUIET_ENV
    from .engines.environment import cache_dir

    env = dict(os.environ)
    for key, value in {**QUIET_ENV, "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
                       "VLLM_LOGGING_LEVEL": "INFO"}.items():
        env.setdefault(key, value)
    if not on_gpu():
        for key, value in {**CPU_ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir() / "inductor")}.items():
            env.setdefault(key, value)
    return env


def server_args(model: str, served_name: str, port: int, *, trust_remote_code: bool = False,
                extra: list[str] | None = None) -> list[str]:
    """`vllm serve`'s arguments, through its module entry point (works for the CPU and GPU packages)."""
    from .engines import on_gpu

    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if not on_gpu():
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
        guard = [sys.executable, "-m", "vlm_batch.judge", "--guard", str(os.getpid()), self.log_path + ".pid", "--",
                 *argv]
        began = time.time()
        with os.fdopen(fd, "w") as out:
            self.proc = subprocess.Popen(guard, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
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


# -- the server's numbers ------------------------------------------------------------------------------

def metrics(base_url: str) -> dict | None:
    """Chat calls by status and the running/waiting requests, from vLLM's Prometheus /metrics."""
    root = base_url.rsplit("/v1", 1)[0]
    try:
        with urllib.request.urlopen(root + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out = {"calls": 0, "errors": 0, "running": 0.0, "waiting": 0.0, "steps": 0, "generated": 0}
    for line in text.splitlines():
        if line.startswith("http_requests_total{") and 'handler="/v1/chat/completions"' in line:
            value = float(line.rsplit(" ", 1)[1])
            out["calls"] += int(value)
            if 'status="2xx"' not in line:
                out["errors"] += int(value)
        elif line.startswith("vllm:num_requests_running{"):
            out["running"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_waiting{"):
            out["waiting"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:iteration_tokens_total_count{"):   # one per engine step
            out["steps"] += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("vllm:generation_tokens_total{"):
            out["generated"] += int(float(line.rsplit(" ", 1)[1]))
    return out


class Watch:
    """While scoring runs: the server's call counts before and after, and its peak of running requests."""

    def __init__(self, base_url: str, every: float = 0.05):
        self.base_url, self.every = base_url, every
        self.before = metrics(base_url)
        self.peak_running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="vlm-batch-judge-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            now = metrics(self.base_url)
            if now is not None:
                self.peak_running = max(self.peak_running, int(now["running"]))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        after = metrics(self.base_url)
        if self.before is None or after is None:
            return {"peak_running": self.peak_running or None}
        steps, generated = after["steps"] - self.before["steps"], after["generated"] - self.before["generated"]
        # more than one generated token per engine step: requests were decoded in the same batch
        return {"server_calls": after["calls"] - self.before["calls"],
                "server_errors": after["errors"] - self.before["errors"], "peak_running": self.peak_running,
                "tokens_per_step": round(generated / steps, 2) if steps else None}


# -- what scoring is pointed at ------------------------------------------------------------------------

@dataclass
class Judge:
    """The judge a dataset is scored with: its name for VLMEvalKit, where it answers, how many at once."""
    name: str                              # the model VLMEvalKit's judge asks for (the served name)
    base_url: str | None = None            # an OpenAI-compatible root ending in /v1; None: VLMEvalKit's own
    nproc: int = DEFAULT_NPROC
    model: str | None = None               # what it serves (a checkpoint or hub id), for the report
    key: str | None = None
    server: JudgeServer | None = None      # ours, when we started it
    stats: list = field(default_factory=list)

    def kwargs(self) -> dict:
        """VLMEvalKit's judge arguments (`dataset.evaluate(path, **kwargs)`), as its run.py builds them."""
        out = {"model": self.name, "nproc": self.nproc}
        if self.base_url:
            out["api_base"] = f"{self.base_url.rstrip('/')}/chat/completions"
            out["key"] = self.key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            if self.server is not None:
                out["wait"] = 0   # our own server: a failed call is a dead server, not a rate limit
        return out

    def check(self) -> None:
        """VLMEvalKit's own `working()` test of the judge, first: it would otherwise fall back to exact
        matching without a word, and cache that fallback's answers as judged."""
        if self.server is not None and not self.server.alive():
            raise JudgeError(f"the judge server for {self.model} is not running (it exited): "
                             f"{self.server.log_tail()}")
        from vlmeval.dataset.utils.judge_util import build_judge

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            working = build_judge(**self.kwargs()).working()   # build_judge drops nproc itself
        if not working:
            where = self.base_url or "VLMEvalKit's API"
            raise JudgeError(f"the judge {self.name} at {where} does not answer (VLMEvalKit's working() check "
                             "failed); refusing to fall back to exact matching")


def external(name: str, base_url: str, nproc: int = DEFAULT_NPROC) -> Judge:
    """A judge server the user already runs (--judge-base-url); without a name, the one it serves."""
    if not name or name == EXACT or is_local(name) and not os.path.exists(name):
        served = served_models(base_url)
        if len(served) == 1:
            name = served[0]
        elif not name or name == EXACT:
            raise JudgeError(f"{base_url} serves {served or 'no models'}; name the judge model with --judge")
    return Judge(name=name, base_url=base_url, nproc=nproc, model=name)


def served_models(base_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=10) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise JudgeError(f"the judge server at {base_url} does not answer: {exc}") from exc


# -- judge caches --------------------------------------------------------------------------------------

def _caches(prediction_file: str):
    """(path, contents) of VLMEvalKit's judge caches beside this prediction file, under the work dir
    the user gave; VLMEvalKit's own evaluate unpickles the same files."""
    import pickle

    from .vlmeval_bridge import scoring_caches

    for cache in scoring_caches(prediction_file):
        try:
            with open(cache, "rb") as fh:
                data = pickle.load(fh)
        except Exception:
            continue
        if isinstance(data, dict):
            yield cache, data


def forget_failed(prediction_file: str, extra: tuple = ()) -> int:
    """Drop, from VLMEvalKit's judge caches of this prediction file, the items whose judge call failed
    (VLMEvalKit caches a random pick for them): a later `--mode eval` judges exactly those again.
    Returns how many were dropped."""
    import pickle

    dropped = 0
    for cache, data in _caches(prediction_file):
        # a Y/N cache holds the judge's word; "Unknown" is what a failed call leaves (asked again anyway)
        bad = [k for k, v in data.items()
               if v == "Unknown" or any(m in str(v) for m in FAILED_MARKERS + tuple(extra))]
        if bad:
            for k in bad:
                del data[k]
            tmp = cache + ".partial"
            with open(tmp, "wb") as fh:
                pickle.dump(data, fh)
            os.replace(tmp, cache)
            dropped += len(bad)
    return dropped


# -- the guard -----------------------------------------------------------------------------------------

def _guard(parent: int, pid_file: str, argv: list[str]) -> int:
    """Run the server; stop it (its whole group) when asked, or when `parent` is gone."""
    child = subprocess.Popen(argv)
    Path(pid_file).write_text(str(child.pid))

    def stop(*_):
        try:
            child.terminate()
            child.wait(10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle; it stops us
    while child.poll() is None:
        if os.getppid() != parent:
            stop()
        time.sleep(0.5)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the server is gone: whatever it left goes too
    os.killpg(0, signal.SIGTERM)
    return child.returncode



# -- scoring through a judge ---------------------------------------------------------------------------

def needs_llm(dataset) -> bool:
    """Whether VLMEvalKit's evaluate of this dataset asks an LLM judge (rule-based VQA scoring does not)."""
    return type(dataset).__name__ not in ("ImageVQADataset", "CustomVQADataset")


def score_with(dataset, path: str, judge: Judge):
    """VLMEvalKit's `evaluate`, unchanged, pointed at `judge`; returns (score, the judge's numbers).

    A judge that is down, or a server of ours that dies while scoring, ends the scoring with a
    JudgeError: the judge caches keep every item judged before it, minus the failed calls VLMEvalKit
    cached as random picks, so `--mode eval` later judges only the rest. The predictions are untouched.
    """
    from . import vlmeval_bridge as bridge

    began = time.time()
    watch = Watch(judge.base_url) if judge.base_url else None   # counts our working() check too
    try:
        judge.check()
    except BaseException:
        if watch is not None:
            watch.stop()
        raise
    stats = {"model": judge.model or judge.name, "name": judge.name, "base_url": judge.base_url,
             "nproc": judge.nproc, "server_start_s": round(judge.server.started_s, 3)
             if judge.server is not None and judge.server.started_s else None}
    error = None
    try:
        kwargs = judge.kwargs()
        del kwargs["model"]
        result = bridge.evaluate(dataset, path, judge=judge.name, nproc=kwargs.pop("nproc"), strict_judge=True,
                                 **kwargs)
    except bridge.JudgeFellBack as exc:
        error, result = str(exc), None
    finally:
        elapsed = time.time() - began
        seen = watch.stop() if watch is not None else {}
    died = judge.server is not None and not judge.server.alive()
    lost = 0
    if died or error:
        lost = forget_failed(path, extra=("Failed in Prefetch, no GPT-based answer matching",) if error else ())
        bridge.drop_scores(path)
    calls = seen.get("server_calls")
    failures = (seen.get("server_errors") or 0) + lost
    stats.update(calls=calls, failures=failures, time_s=round(elapsed, 3),
                 calls_per_s=round(calls / elapsed, 3) if calls and elapsed else None,
                 peak_running=seen.get("peak_running"), tokens_per_step=seen.get("tokens_per_step"))
    judge.stats.append(stats)
    if died and judge.server.stopped:
        raise JudgeError(f"the judge server for {judge.model} was stopped (interrupted) while scoring "
                         f"{dataset.dataset_name}: {lost} items were not judged; the judged ones are cached, the "
                         f"predictions kept in {path}: rerun with --mode eval to judge the rest", stats)
    if died:
        raise JudgeError(f"the judge server for {judge.model} died while scoring {dataset.dataset_name} "
                         f"(exit status {judge.server.proc.returncode if judge.server.proc else '?'}): "
                         f"{lost} items were not judged; the judged ones are cached, the predictions kept in "
                         f"{path}: rerun with --mode eval to judge the rest. {judge.server.log_tail(2)}", stats)
    if error:
        raise JudgeError(f"{error}; {lost} items were not judged; rerun with --mode eval", stats)
    return result, stats


class JudgeService:
    """The suite's judge, resolved once: one server for every dataset that needs an LLM judge, started
    when the first one does (on a GPU, once the evaluated model's engine is released), stopped at the end."""

    def __init__(self, name: str = EXACT, *, base_url: str | None = None, nproc: int = DEFAULT_NPROC,
                 trust_remote_code: bool = False, serve_args: list[str] | None = None, share_gpu: bool = False):
        self.name, self.base_url, self.nproc = name, base_url, nproc
        self.trust_remote_code, self.serve_args = trust_remote_code, serve_args
        self.local = base_url is None and is_local(name)
        self.judge: Judge | None = None
        self.server: JudgeServer | None = None
        self.error: JudgeError | None = None
        self._lock = threading.Lock()
        self.engine_free = threading.Event()
        self.engine_free.set()
        self.share_gpu = share_gpu

    def scores(self, dataset) -> bool:
        """Whether this dataset's scoring goes through the suite's judge (ours or --judge-base-url)."""
        return (self.local or self.base_url is not None) and needs_llm(dataset)

    def waits_for_engine(self, dataset) -> bool:
        """Its scoring would wait for the GPU the evaluated model's engine holds: put it off, so the
        datasets behind it are written and rule-scored meanwhile."""
        return self.local and not self.engine_free.is_set() and needs_llm(dataset)

    def engine_started(self) -> None:
        """The evaluated model's engine is about to take the GPU: a local judge that needs it waits (see
        `get`). One left from the previous model (its scoring is over by now) is stopped first, and
        started again when a dataset of this model needs it."""
        from .engines import on_gpu

        if self.local and on_gpu() and not self.share_gpu:
            with self._lock:
                if self.server is not None:
                    self.server.close()
                    self.server = self.judge = None
                self.engine_free.clear()

    def engine_released(self) -> None:
        self.engine_free.set()

    def get(self) -> Judge:
        """The judge, its server started on first use; a failed start fails every later use alike."""
        with self._lock:
            if self.judge is not None:
                return self.judge
            if self.error is not None:
                raise self.error
            try:
                if self.base_url:
                    self.judge = external(self.name, self.base_url, self.nproc)
                elif self.local:
                    self.engine_free.wait()
                    model = resolve(self.name)
                    self.server = JudgeServer(model, served_name=Path(self.name).name or self.name,
                                              trust_remote_code=self.trust_remote_code,
                                              extra_args=self.serve_args).start()
                    self.judge = Judge(name=self.server.served_name, base_url=self.server.base_url,
                                       nproc=self.nproc, model=self.name, server=self.server)
                else:
                    self.judge = Judge(name=self.name, nproc=self.nproc, model=self.name)
            except JudgeError as exc:
                self.error = exc
                raise
            return self.judge

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--guard" and sys.argv[4] == "--":
        sys.exit(_guard(int(sys.argv[2]), sys.argv[3], sys.argv[5:]))
    sys.exit("usage: python -m vlm_batch.judge --guard PARENT_PID PID_FILE -- COMMAND ...")
