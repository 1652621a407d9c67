"""The judge server's numbers, from vLLM's Prometheus `/metrics`: calls, errors, running requests."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request


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

