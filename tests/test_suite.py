"""Suites: many datasets through one engine per model, scored while the engine goes on; resumable,
locked against a second run of the same, and several models one after another."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import Run, read_trace, shape_rows, wait_for, write_dataset
from vlm_batch import hookimpl, runner, state
from vlm_batch.cli import cli
from vlm_batch.settings import Settings
from vlm_batch.plan import DatasetSpec, ModelSpec, Plan, PlanError, from_config
from vlm_batch.plugins import pm
from vlm_batch.suite import run_suite
from vlm_batch.state import journal_path
from vlm_batch.vlmeval.files import prediction_file


class Slow:
    """A slower model: the engine takes each request after a pause, so datasets overlap in time."""

    def __init__(self, pause: float):
        self.pause = pause

    @hookimpl(tryfirst=True)
    def vlm_batch_generate(self, card, engine, requests):
        def paced():
            for request in requests:
                time.sleep(self.pause)
                yield request
        return engine.generate(paced())


@pytest.fixture
def slow():
    pm.register(Slow(0.01), name="slow-test-plugin")
    yield
    pm.unregister(name="slow-test-plugin")


@pytest.fixture
def three(lmudata):
    """Three small datasets of distinct rows (indices apart, so a trace tells them apart)."""
    return [write_dataset(lmudata, f"Suite{c}", shape_rows(40, seed=40 + i, first=1000 * i))
            for i, c in enumerate("ABC")]


# -- one engine for every dataset --------------------------------------------------------------------

@pytest.mark.engine
def test_three_datasets_through_one_engine_equal_three_single_runs(tiny_card, vllm_engine, three, slow,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("PRED_FORMAT", "tsv")   # xlsx files carry a creation time; compare bytes of tsv
    singles = [runner.run_eval(tiny_card, name, work_dir=str(tmp_path / "single"), engine=vllm_engine)
               for name in three]
    # A window smaller than a dataset, so that rows of the next dataset must follow in while it runs.
    monkeypatch.setattr(vllm_engine, "window", 16)
    plan = Plan([ModelSpec(tiny_card, vllm_engine)], [DatasetSpec(n) for n in three])
    result = run_suite(plan, Settings(work_dir=str(tmp_path / "suite")))
    assert [s.dataset for s in result.summaries] == three
    for single, together in zip(singles, result.summaries):
        assert together.prediction_file.endswith(".tsv")
        assert Path(together.prediction_file).read_bytes() == Path(single.prediction_file).read_bytes()
        assert together.score.equals(single.score) and together.generated == 40 and not together.failed

    # The engine's own window: at the steps whose running set held two datasets' rows, and at every
    # step while rows remained, it was full.
    window = result.summaries[0].engine_stats["window"]
    assert window["size"] == 16 and window["boundary_steps"] >= 2, window
    assert window["min_in_flight_at_boundary"] == window["min_in_flight_while_pending"] == 16, window

    # Scoring overlapped generation: A was scored before C's last answer came back.
    suite = json.loads(Path(result.report_file).read_text())
    timings = {d["dataset"]: d["timings"] for d in suite["datasets"]}
    a, c = timings[three[0]], timings[three[2]]
    assert a["last_answer_at"] <= a["scoring_started_at"] < a["scoring_ended_at"] < c["last_answer_at"], timings
    model = suite["models"][0]
    for phase in ("imports", "engine_start", "dataset_load", "first_item", "generation", "scoring"):
        assert phase in model["phases_s"], model["phases_s"]
    with open(tmp_path / "suite" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["model"], r["items"], r["failed"]) for r in rows] == [
        (n, tiny_card.name, "40", "0") for n in three]
    assert [float(r["score"]) for r in rows] == pytest.approx([s.score["Overall"].iloc[0] for s in singles])


@pytest.mark.engine
def test_an_evaluator_that_fails_for_one_dataset_does_not_stop_the_others(tiny_card, vllm_engine, lmudata,
                                                                          tmp_path):
    rows = shape_rows(8, seed=50, first=500)
    rows[3]["question"] = ""          # VLMEvalKit's MCQ evaluator raises a TypeError on it
    broken = write_dataset(lmudata, "SuiteEvalFails", rows)
    fine = write_dataset(lmudata, "SuiteEvalFine", shape_rows(8, seed=51, first=600))
    plan = Plan([ModelSpec(tiny_card, vllm_engine)], [DatasetSpec(broken), DatasetSpec(fine)])
    result = run_suite(plan, Settings(work_dir=str(tmp_path)))
    bad, good = result.summaries
    assert "TypeError" in bad.eval_error and Path(bad.prediction_file).exists()
    assert good.eval_error is None and good.score is not None and good.generated == 8
    with open(tmp_path / "summary.csv") as fh:
        status = {r["dataset"]: r["status"] for r in csv.DictReader(fh)}
    assert status == {broken: "evaluation failed", fine: "done"}


# -- names, configs, models one after another ---------------------------------------------------------

def test_bad_names_fail_in_one_line_before_any_engine(tmp_path, monkeypatch, three):
    import vlm_batch.engines as engines

    monkeypatch.setattr(engines, "load", lambda *a, **k: pytest.fail("an engine was loaded"))
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-qwen2-vl", "no-such-model", "--data", three[0],
                                      "NoSuchSet", "AlsoMissing", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    # A bad model name fails at once, before the datasets' check (which imports VLMEvalKit: seconds).
    assert "'no-such-model'" in last and "NoSuchSet" not in last, last
    assert "tiny-qwen2-vl" in last and "tiny-qwen2-vl" not in last.split("Available")[0]
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-qwen2-vl", "--data", three[0], "NoSuchSet",
                                      "AlsoMissing", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert "NoSuchSet" in last and "AlsoMissing" in last and three[0] not in last.split("and no file")[0], last
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"model": {"tiny-qwen2-vl": {"max_new_token": 3}, "gone": {}},
                                  "data": {"NoSuchSet": {}, three[0]: {"class": "ImageMCQDataset"}}}))
    with pytest.raises(PlanError) as caught:
        from_config(str(config), engine="hf")
    message = str(caught.value)
    assert "'gone'" in message and "max_new_token" in message and "NoSuchSet" in message
    assert "\n" not in message


@pytest.mark.engine
def test_two_models_from_a_config_one_after_another(tiny_card, three, tmp_path):
    """A renamed model with an override, then the model itself: the second engine starts after the
    first closed, both rows land in summary.csv, and the override shows in what was generated."""
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({
        "model": {"tiny-one-token": {"model": tiny_card.name, "max_new_tokens": 1, "engine": "hf"},
                  tiny_card.name: {"engine": "hf"}},
        "data": {three[0]: {}, three[1]: {"class": "ImageMCQDataset", "dataset": three[1]}}}))
    result = CliRunner().invoke(cli, ["eval", "--config", str(config), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    suite = json.loads((tmp_path / "w" / "suite_report.json").read_text())
    first, second = suite["models"]
    assert (first["model"], second["model"]) == ("tiny-one-token", tiny_card.name)
    assert first["engine_times"]["closed_at"] <= second["engine_times"]["began_at"]
    assert first["rss_after_close_mb"] > 0 and second["rss_after_close_mb"] > 0
    by = {(d["model"], d["dataset"]): d for d in suite["datasets"]}
    assert all(by[("tiny-one-token", n)]["output_tokens"] == 40 for n in three[:2])   # one token each
    assert (tmp_path / "w" / "tiny-one-token" / f"tiny-one-token_{three[0]}.xlsx").exists()
    with open(tmp_path / "w" / "summary.csv") as fh:
        cells = {(r["dataset"], r["model"]) for r in csv.DictReader(fh)}
    assert cells == {(n, m) for n in three[:2] for m in ("tiny-one-token", tiny_card.name)}
    header = next(line for line in result.output.splitlines() if line.startswith("dataset") and "|" not in line)
    assert header.split() == ["dataset", "tiny-one-token", tiny_card.name]


@pytest.mark.engine
def test_a_model_whose_engine_cannot_start_is_reported_and_the_next_runs(tiny_card, three, tmp_path):
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({
        "model": {"tiny-broken": {"model": tiny_card.name, "max_model_len": 10**7,   # beyond its positions
                                        "engine": "vllm"},                  # asked for: no fallback
                  tiny_card.name: {"engine": "hf"}},
        "data": {three[0]: {}}}))
    result = CliRunner().invoke(cli, ["eval", "--config", str(config), "--work-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "Error: tiny-broken: vLLM could not start tiny-broken: " in result.output and "max_model_len" in result.output
    with open(tmp_path / "summary.csv") as fh:
        status = {r["model"]: r["status"] for r in csv.DictReader(fh)}
    assert status[tiny_card.name] == "done" and status["tiny-broken"].startswith("error: ")


# -- resume and locks across processes ---------------------------------------------------------------

@pytest.mark.engine
def test_second_run_refuses_a_killed_suite_resumes_without_regenerating(tiny_card, three, tmp_path):
    args = ["--dataset", *three, "--engine", "hf", "--batch-size", "4", "--work-dir", str(tmp_path / "w")]
    jb = journal_path(str(tmp_path / "w"), tiny_card.name, three[1])
    first = Run(args, tmp_path / "trace0")
    lock = Path(state.RunLock(str(tmp_path / "w"), tiny_card.name, three[2]).path)
    wait_for(lock.exists, first)

    second = Run(args, tmp_path / "trace1")   # the same command, at the same time
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("Error: ") and f"PID {first.pid}" in err
    assert read_trace(tmp_path / "trace1") == []

    a_report = Path(str(prediction_file(str(tmp_path / "w"), tiny_card.name, three[0]))[:-5] + "_run.json")
    # kill -9 in the middle of the second dataset, the first one written and scored
    wait_for(lambda: len(_journaled(jb)) >= 8 and a_report.exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _journaled(jb)
    assert 8 <= len(before) < 40 and lock.exists()       # the killed run's lock is left behind
    a_file = Path(prediction_file(str(tmp_path / "w"), tiny_card.name, three[0]))
    a_mtime = a_file.stat().st_mtime

    again = Run(args, tmp_path / "trace2")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    traced = {n: read_trace(tmp_path / "trace2", n) for n in three}
    assert traced[three[0]] == []                         # finished: not generated again
    assert not set(traced[three[1]]) & before and len(traced[three[1]]) == 40 - len(before)
    assert len(traced[three[2]]) == 40
    assert a_file.stat().st_mtime == a_mtime and "finished by an earlier run" in out
    assert f"resumed {len(before)}" in out and not lock.exists()
    with open(tmp_path / "w" / "summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["reused", "done", "done"]


def _journaled(path) -> set:
    from vlm_batch import journal

    return set(journal.read(path)[1]) if Path(path).exists() else set()


# -- the lock itself ---------------------------------------------------------------------------------

def _write_lock(lock, pid, host, started=None):
    os.makedirs(os.path.dirname(lock.path), exist_ok=True)
    Path(lock.path).write_text(json.dumps({"run": "another", "pid": pid, "host": host, "started": started,
                                           "since": "then"}))


def test_a_live_holder_is_refused_by_pid_and_waited_for(tmp_path):
    import threading

    import psutil

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = state.RunLock(str(tmp_path), "m", "d")
        _write_lock(lock, holder.pid, socket.gethostname(), psutil.Process(holder.pid).create_time())
        with pytest.raises(state.Locked, match=f"PID {holder.pid} on {socket.gethostname()}.*--wait"):
            lock.acquire()
        got = []
        waiter = threading.Thread(target=lambda: got.append(lock.acquire(wait=True)))
        waiter.start()
        time.sleep(0.5)
        assert not got                          # still waiting while the holder lives
        holder.kill()
        holder.wait()
        waiter.join(timeout=30)
        assert got and json.loads(Path(lock.path).read_text())["pid"] == os.getpid()
        lock.release()
        assert not Path(lock.path).exists()
    finally:
        holder.kill()


def test_locks_of_dead_and_silent_runs_are_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = state.RunLock(str(tmp_path), "m", "dead")
    _write_lock(lock, gone.pid, socket.gethostname(), time.time() - 5)
    assert lock.try_acquire() is None and json.loads(Path(lock.path).read_text())["pid"] == os.getpid()

    other = state.RunLock(str(tmp_path), "m", "elsewhere")      # a shared work dir: another machine's run
    _write_lock(other, 1, "another-host")
    assert other.try_acquire() == json.loads(Path(other.path).read_text())   # refreshed recently: held
    old = time.time() - state.STALE_S - 5
    os.utime(other.path, (old, old))
    assert other.try_acquire() is None                          # silent for longer than STALE_S: gone


def test_prediction_file_is_vlmevalkits_name(tmp_path, monkeypatch):
    from vlmeval.smp import get_pred_file_path

    for fmt in (None, "tsv", "json"):
        if fmt:
            monkeypatch.setenv("PRED_FORMAT", fmt)
        assert prediction_file(str(tmp_path), "M", "VLMBatchShapes") == get_pred_file_path(
            str(tmp_path / "M"), "M", "VLMBatchShapes", use_env_format=True)
