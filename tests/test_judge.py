"""A local LLM judge: a real `vllm serve` on CPU of a tiny text model trained to answer "B".

Predictions that exact matching cannot map are scored through it by VLMEvalKit's own MCQ evaluate;
the score the judge's "B" implies differs from exact matching's, so the tests fail if the judge's
answers were not used. One server serves the module; the kill test and the CLI start their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import shape_rows, write_dataset
from vlm_batch.vlmeval.datasets import load_dataset
from vlm_batch.vlmeval.files import prediction_file, write_predictions
from vlm_batch.vlmeval.scoring import evaluate

UNSURE = "I really cannot tell from this picture."   # no option letter, no option's text


def _predictions(rows, every: int = 3) -> dict:
    """Every `every`-th row answered with its right letter; the rest with words nothing can map."""
    return {row["index"]: (row["answer"] if i % every == 0 else UNSURE) for i, row in enumerate(rows)}


def _expected(rows, preds, letter: str) -> tuple[float, float]:
    """(exact matching's accuracy, the accuracy when every unmapped prediction is judged `letter`)."""
    mapped = sum(1 for r in rows if preds[r["index"]] == r["answer"])
    judged = sum(1 for r in rows if preds[r["index"]] == UNSURE and r["answer"] == letter)
    return mapped / len(rows), (mapped + judged) / len(rows)


def _setup(lmudata, tmp_path, name: str, n: int, model: str = "tiny-qwen2-vl"):

    rows = shape_rows(n, seed=11)
    write_dataset(lmudata, name, rows)
    dataset = load_dataset(name)
    preds = _predictions(rows)
    path = prediction_file(str(tmp_path / "outputs"), model, name)
    write_predictions(dataset, preds, path)
    return rows, dataset, preds, path


def _overall(score) -> float:
    from vlm_batch.report import main_score

    return main_score(score)[1]


def _port_free(port: int) -> bool:
    """Nothing listens on it (connections the server closed may still wait in TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _servers_of(model: str, port: int | None = None) -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and model in cmd and (port is None or str(port) in cmd):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def judge_model():
    from vlm_batch_testing import judge as tiny_judge

    return tiny_judge.checkpoint()


@pytest.fixture(scope="module")
def server(judge_model):
    """The module's judge server; a start costs 20-45 s here."""
    from vlm_batch.judge.server import JudgeServer

    started = time.time()
    srv = JudgeServer(judge_model, served_name="tiny-judge").start()
    print(f"\njudge server up in {time.time() - started:.1f}s on {srv.base_url}")
    yield srv
    srv.close()


def test_local_judge_scores_what_its_answers_imply(server, lmudata, tmp_path):
    """The score is the one "B" for every unmapped prediction gives, not exact matching's; the
    server took many of the calls at once, and counted them."""
    from vlm_batch_testing import judge as tiny_judge
    from vlm_batch.judge.service import Judge, score_with

    rows, dataset, preds, path = _setup(lmudata, tmp_path, "JudgeShapesA", 48)
    exact, judged = _expected(rows, preds, tiny_judge.LETTER)
    assert exact != judged   # the set is built so the judge matters

    other = tmp_path / "exact" / "tiny-qwen2-vl"
    other.mkdir(parents=True)
    exact_path = str(other / Path(path).name)
    write_predictions(dataset, preds, exact_path)
    assert _overall(evaluate(dataset, exact_path)) == pytest.approx(exact)

    judge = Judge(name="tiny-judge", base_url=server.base_url, nproc=64, model="tiny-judge", server=server)
    score, stats = score_with(dataset, path, judge)
    assert _overall(score) == pytest.approx(judged)
    unmapped = sum(1 for v in preds.values() if v == UNSURE)
    # one call per unmapped item (its "B" maps at once) and VLMEvalKit's two working() checks
    assert stats["calls"] == unmapped + 2, stats
    assert stats["failures"] == 0
    print(f"\njudge: {stats}")
    result = pickle.loads(Path(path.replace(".xlsx", "_tiny-judge_result.pkl")).read_bytes())
    assert all(result[i]["log"] == "Match Log: B. " for i, v in preds.items() if v == UNSURE)


def test_server_answers_concurrent_requests_in_one_batch(server):
    """16 requests at once: all answered "B", and the server's metrics show them decoded together
    (more generated tokens than engine steps; one at a time, each step would make one token)."""
    import urllib.request

    from vlm_batch.judge.metrics import Watch, metrics

    barrier = threading.Barrier(16)
    answers = []

    def ask(wait: bool = True):
        # long answers (ignore_eos): requests that reach the server a little apart still overlap
        body = json.dumps({"model": "tiny-judge", "messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": 1000, "ignore_eos": True, "temperature": 0}).encode()
        request = urllib.request.Request(server.base_url + "/chat/completions", body,
                                         {"Content-Type": "application/json"})
        if wait:
            barrier.wait()
        with urllib.request.urlopen(request, timeout=300) as resp:
            answers.append(json.loads(resp.read())["choices"][0]["message"]["content"])

    ask(wait=False)   # a first request of its own: whatever a fresh server does once is not measured
    answers.clear()
    before = metrics(server.base_url)
    watch = Watch(server.base_url, every=0.02)
    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = watch.stop()
    print(f"\nconcurrent: {seen}")
    assert len(answers) == 16 and all(a.startswith("B") for a in answers)
    assert metrics(server.base_url)["calls"] - before["calls"] == 16
    assert seen["tokens_per_step"] > 2, seen


def test_server_that_cannot_start_says_why_and_leaves_nothing(tmp_path):
    from vlm_batch.judge import JudgeError
    from vlm_batch.judge.server import JudgeServer

    missing = str(tmp_path / "no-such-model")
    os.makedirs(missing)
    (Path(missing) / "config.json").write_text("{}")
    srv = JudgeServer(missing, served_name="broken")
    with pytest.raises(JudgeError, match="exited with status") as info:
        srv.start()
    assert "\n" not in str(info.value)
    print(f"\n{info.value}")
    assert not _servers_of(missing)
    assert _port_free(srv.port)


def test_cli_judge_base_url_uses_a_running_server(server, lmudata, tmp_path):
    """`--judge-base-url` (VLMEvalKit's flag): the judge a user already runs, its model found by asking it."""
    from vlm_batch_testing import judge as tiny_judge

    rows, _dataset, preds, path = _setup(lmudata, tmp_path, "JudgeShapesB", 24)
    _exact, judged = _expected(rows, preds, tiny_judge.LETTER)
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "eval", "--mode", "eval", "--model", "tiny-qwen2-vl",
                          "--dataset", "JudgeShapesB", "--work-dir", str(tmp_path / "outputs"),
                          "--judge-base-url", server.base_url], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(Path(path.replace(".xlsx", "_run.json")).read_text())
    assert report["judge"]["model"] == "tiny-judge"
    assert report["judge"]["calls"] == sum(v == UNSURE for v in preds.values()) + 2
    assert _overall(report["score"]) == pytest.approx(judged)
    assert "judge tiny-judge:" in out.stdout


def test_judge_killed_mid_scoring_then_rerun_finishes(judge_model, lmudata, tmp_path):
    """A killed server: a clear error, predictions intact, failed calls not cached; then
    `vlm-batch eval --mode eval --judge PATH` starts its own server, judges only the rest, and stops it."""
    from vlm_batch_testing import judge as tiny_judge
    from vlm_batch.judge import JudgeError
    from vlm_batch.judge.server import JudgeServer
    from vlm_batch.judge.service import Judge, score_with

    rows, dataset, preds, path = _setup(lmudata, tmp_path, "JudgeShapesC", 90)
    _exact, judged = _expected(rows, preds, tiny_judge.LETTER)
    before = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    served = Path(judge_model).name   # the name `--judge PATH` serves it under: VLMEvalKit's caches go by it
    cache = Path(path.replace(".xlsx", f"_{served}_result.pkl"))

    srv = JudgeServer(judge_model, served_name=served).start()
    try:
        judge = Judge(name=served, base_url=srv.base_url, nproc=2, model=judge_model, server=srv)
        outcome = {}

        def scoring():
            try:
                outcome["score"] = score_with(dataset, path, judge)
            except JudgeError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=scoring)
        thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:   # a few items judged: kill the server under the rest
            try:
                if len(pickle.loads(cache.read_bytes())) >= 8:
                    break
            except (OSError, EOFError, pickle.UnpicklingError):
                pass
            time.sleep(0.05)
        os.kill(srv.pid, signal.SIGKILL)
        thread.join(300)
    finally:
        srv.close()
    assert "error" in outcome, outcome
    message = str(outcome["error"])
    print(f"\n{message}")
    assert "died while scoring JudgeShapesC" in message and "--mode eval" in message and "\n" not in message
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == before
    assert not Path(path.replace(".xlsx", "_acc.csv")).exists()   # no score that looks final
    judged_before = pickle.loads(cache.read_bytes())
    assert judged_before and not any("Failed" in v["log"] for v in judged_before.values())   # no random picks
    left = sum(1 for i, v in preds.items() if v == UNSURE and i not in judged_before)
    assert left > 0

    rows_d, _d, preds_d, path_d = _setup(lmudata, tmp_path, "JudgeShapesD", 24)   # a suite: one server for both
    out = subprocess.run([sys.executable, "-m", "vlm_batch", "eval", "--mode", "eval", "--model", "tiny-qwen2-vl",
                          "--dataset", "JudgeShapesC", "JudgeShapesD", "--work-dir", str(tmp_path / "outputs"),
                          "--judge", judge_model], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(Path(path.replace(".xlsx", "_run.json")).read_text())
    other = json.loads(Path(path_d.replace(".xlsx", "_run.json")).read_text())
    print(f"rerun judge: {report['judge']}\nsecond dataset: {other['judge']}")
    assert other["judge"]["base_url"] == report["judge"]["base_url"]   # the same server
    assert _overall(other["score"]) == pytest.approx(_expected(rows_d, preds_d, tiny_judge.LETTER)[1])
    summary = json.loads((tmp_path / "outputs" / "summary.json").read_text())
    assert {r["dataset"]: r["judge_calls"] for r in summary} == {"JudgeShapesC": report["judge"]["calls"],
                                                                "JudgeShapesD": other["judge"]["calls"]}
    assert _overall(report["score"]) == pytest.approx(judged)
    assert report["judge"]["name"] == served
    assert report["judge"]["calls"] == left + 2   # only what was not judged, and the two working() checks
    port = int(report["judge"]["base_url"].rsplit(":", 1)[1].split("/")[0])
    assert not _servers_of(judge_model, port)   # (the module's own server, on another port, still runs)
    assert _port_free(port)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == before


GUARDED_PARENT = r'''
import subprocess, sys, time
guard = subprocess.Popen([sys.executable, "-m", "vlm_batch.engines.guard", str(__import__("os").getpid()),
                          sys.argv[1], "--", sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print(guard.pid, flush=True)
time.sleep(600)
'''


def test_guard_stops_the_server_when_its_parent_is_killed(tmp_path):
    """A crash (SIGKILL) of the process that started the server: the guard stops the server's group.
    The command under the guard is a stand-in (a sleeping Python); the guard is the real one."""
    pid_file = tmp_path / "server.pid"
    parent = subprocess.Popen([sys.executable, "-c", GUARDED_PARENT, str(pid_file)], stdout=subprocess.PIPE, text=True)
    guard = int(parent.stdout.readline())
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    server = int(pid_file.read_text())
    assert psutil.pid_exists(server)
    parent.kill()
    parent.wait()
    procs = [psutil.Process(server), psutil.Process(guard)]
    gone, alive = psutil.wait_procs(procs, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, "the server or its guard outlived the process that started them"


def test_on_one_gpu_the_judge_waits_for_the_engine(monkeypatch):
    """Pure ordering logic, with a stand-in server: on a GPU, the judge's server starts only once the
    evaluated model's engine is released, and is stopped before the next model's engine starts."""
    from vlm_batch import engines
    from vlm_batch.judge import service as judge

    events = []

    class Server:
        def __init__(self, model, **kwargs):
            self.served_name, self.base_url, self.started_s = "stand-in", "http://127.0.0.1:1/v1", 0.0

        def start(self):
            events.append("judge started")
            return self

        def close(self):
            events.append("judge stopped")

    monkeypatch.setattr(engines, "on_gpu", lambda: True)
    monkeypatch.setattr(judge, "JudgeServer", Server)
    monkeypatch.setattr(judge, "is_local", lambda name: True)
    monkeypatch.setattr(judge, "resolve", lambda name: name)
    service = judge.JudgeService("some/judge")
    service.engine_started()
    waiter = threading.Thread(target=lambda: events.append(("got", service.get().name)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and events == []          # scoring waits while the engine holds the GPU
    events.append("engine released")
    service.engine_released()
    waiter.join(10)
    assert events == ["engine released", "judge started", ("got", "stand-in")]
    service.engine_started()                              # the next model's engine
    assert events[-1] == "judge stopped" and service.server is None
    shared = judge.JudgeService("some/judge", share_gpu=True)
    shared.engine_started()
    assert shared.engine_free.is_set()                    # with a share given, nothing waits


def test_cli_judge_path_that_does_not_exist_fails_in_one_line(tmp_path):
    from click.testing import CliRunner

    from vlm_batch.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--judge", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no such checkpoint folder" in result.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "crash"])
def test_cli_stopped_while_judging_leaves_no_server(sig, judge_model, lmudata, tmp_path):
    """`vlm-batch eval --judge PATH` interrupted (Ctrl-C) or killed (a crash) while its judge works:
    the real server and its guard are gone soon after, the port is free, the predictions intact;
    Ctrl-C stops the judging rather than waiting for it, and keeps what was judged."""
    from vlm_batch.judge.metrics import metrics

    name = f"JudgeShapesStop{int(sig)}"
    rows, _dataset, preds, path = _setup(lmudata, tmp_path, name, 600)
    unsure = {i for i, v in preds.items() if v == UNSURE}
    before = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    cache = Path(path.replace(".xlsx", f"_{Path(judge_model).name}_result.pkl"))
    cli = subprocess.Popen([sys.executable, "-m", "vlm_batch", "eval", "--mode", "eval", "--model", "tiny-qwen2-vl",
                            "--dataset", name, "--work-dir", str(tmp_path / "outputs"), "--judge", judge_model],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, ours, port = time.time() + 300, [], None
        while time.time() < deadline and cli.poll() is None:   # judging has begun: the server took calls
            if port is None:
                ours = psutil.Process(cli.pid).children(recursive=True)
                servers = [p for p in ours if "vllm.entrypoints.openai.api_server" in (p.cmdline() or [])]
                if servers:
                    port = int(servers[0].cmdline()[servers[0].cmdline().index("--port") + 1])
            elif (metrics(f"http://127.0.0.1:{port}/v1") or {"calls": 0})["calls"] >= 20:
                break
            time.sleep(0.1)
        assert cli.poll() is None and port is not None, cli.communicate()[1][-3000:]
        ours = psutil.Process(cli.pid).children(recursive=True)
        cli.send_signal(sig)
        sent = time.time()
        _out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    _gone, alive = psutil.wait_procs(ours, timeout=60)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    assert _port_free(port)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == before
    if sig == signal.SIGINT:
        assert cli.returncode == 130 and "Interrupted" in err, err[-3000:]
        judged = {i: v for i, v in pickle.loads(cache.read_bytes()).items() if i in unsure}
        print(f"\nCtrl-C: exited {time.time() - sent:.1f}s after it, {len(judged)} of {len(unsure)} judged")
        assert 0 < len(judged) < len(unsure)   # stopped, not waited for
        assert not any("Failed" in v["log"] for v in judged.values())   # no random picks kept


def test_judged_scoring_waits_for_the_engine_without_holding_up_the_rest(monkeypatch, tmp_path):
    """Pure ordering logic, stand-ins for the datasets and the scoring: on a GPU, while the engine runs,
    a dataset that needs the local judge is put off; one VLMEvalKit scores by rule, finished after it,
    is scored at once; the first is scored once the engine is released, in `wait`."""
    from types import SimpleNamespace

    from vlm_batch import engines, finisher as finishing, report
    from vlm_batch.judge import service as judge
    from vlm_batch.settings import Settings
    from vlm_batch.timeline import Timeline

    class ImageMCQDataset:
        dataset_name = "Judged"

    class ImageVQADataset:
        dataset_name = "ByRule"

    scored = []
    monkeypatch.setattr(engines, "on_gpu", lambda: True)
    monkeypatch.setattr(judge, "is_local", lambda name: True)
    monkeypatch.setattr(finishing, "score", lambda dataset, summary, *a: scored.append(dataset.dataset_name))
    monkeypatch.setattr(report, "write_run_report", lambda summary, card: None)
    service = judge.JudgeService("some/judge")
    finisher = finishing.Finisher(Settings(work_dir=str(tmp_path)), None, service, SimpleNamespace(name="m"), None)

    def run(dataset):
        summary = report.RunSummary(model="m", dataset=dataset.dataset_name,
                                    prediction_file=str(tmp_path / f"{dataset.dataset_name}.xlsx"))
        return finishing.DatasetRun(dataset=dataset, summary=summary, journal_file="", positions=[])

    service.engine_started()
    judged, by_rule = run(ImageMCQDataset()), run(ImageVQADataset())
    finisher.submit(judged, infer=False)
    finisher.submit(by_rule, infer=False)
    by_rule.finished.result(10)
    assert scored == ["ByRule"] and finisher.deferred == [judged]
    service.engine_released()
    finisher.wait(Timeline())
    finisher.shutdown()
    assert scored == ["ByRule", "Judged"]


def test_api_judge_goes_to_vlmevalkit_as_it_names_it(monkeypatch, lmudata, tmp_path, caplog):
    """`--judge gpt-4o-mini` is VLMEvalKit's API judge, not a model to serve: no key here, so VLMEvalKit
    falls back to exact matching, as it does on its own, and we say so instead of keeping quiet."""
    import logging

    from vlm_batch.finisher import score
    from vlm_batch.judge import service as judge
    from vlm_batch.report import RunSummary

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rows, dataset, preds, path = _setup(lmudata, tmp_path, "JudgeShapesApi", 12)
    service = judge.JudgeService("gpt-4o-mini")
    assert not service.local and not service.scores(dataset)
    summary = RunSummary(model="tiny-qwen2-vl", dataset="JudgeShapesApi", prediction_file=path)
    with caplog.at_level(logging.WARNING):
        score(dataset, summary, "gpt-4o-mini", 4, service)
    assert service.server is None
    assert summary.eval_error is None and summary.judge["model"] == "gpt-4o-mini"
    assert _overall(summary.score) == pytest.approx(_expected(rows, preds, "B")[0])   # exact matching's
    assert "judge gpt-4o-mini not working" in caplog.text
