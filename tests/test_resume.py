"""Nothing lost: the journal survives kills at any byte, reruns resume, VLMEvalKit's state is honoured."""

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from vlm_batch_testing import faults
from helpers import Run, read_trace, shape_rows, wait_for as _wait_for, write_dataset
from vlm_batch import journal, runner
from vlm_batch.request import Result
from vlm_batch.state import journal_path, load_progress
from vlm_batch.vlmeval.datasets import load_dataset


# -- the journal itself -------------------------------------------------------------------------

def test_torn_last_record_is_dropped_and_the_journal_goes_on(tmp_path):
    path = tmp_path / "j.journal"
    j = journal.Journal(path, {"model": "m", "dataset": "d"})
    for i in range(5):
        j.append(Result(index=i, text=f"answer {i}", output_tokens=3))
    j.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])      # killed in the middle of the fifth record
    header, records = journal.read(path)
    assert header["model"] == "m" and sorted(records) == [0, 1, 2, 3]
    j = journal.Journal(path, {"model": "m", "dataset": "d"})   # reopening cuts the torn tail
    j.append(Result(index=4, text="again"))
    j.close()
    assert journal.read(path)[1][4]["prediction"] == "again"
    assert len(journal.read(path)[1]) == 5


def test_corrupt_record_in_the_middle_is_dropped(tmp_path):
    path = tmp_path / "j.journal"
    j = journal.Journal(path, {"model": "m", "dataset": "d"})
    for i in range(3):
        j.append(Result(index=i, text=f"answer {i}"))
    j.close()
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"answer 1", b"answer X")   # checksum no longer matches
    path.write_bytes(b"\n".join(lines))
    assert sorted(journal.read(path)[1]) == [0, 2]


def test_failed_items_are_journaled_but_retried(tmp_path, tiny_card):
    path = journal_path(str(tmp_path), tiny_card.name, "Set")
    j = journal.Journal(path, {"model": tiny_card.name, "dataset": "Set"})
    j.append(Result(index=1, text="B"))
    j.append(Result.failed(2, "out of memory"))
    j.close()
    answers, records = load_progress(str(tmp_path), tiny_card.name, "Set")
    assert answers == {1: "B"} and set(records) == {1, 2}


# -- VLMEvalKit's own state ---------------------------------------------------------------------

class Counting:
    """The real engine, with a record of which items it was asked to generate."""

    def __init__(self, engine):
        self.engine, self.asked, self.name = engine, [], engine.name

    def generate(self, requests, **options):
        def counted():
            for r in requests:
                self.asked.append(r.index)
                yield r
        return self.engine.generate(counted(), **options)


@pytest.mark.engine
def test_resume_a_run_vlmevalkit_started(tmp_path, tiny_card, vllm_engine, lmudata):
    name = write_dataset(lmudata, "HalfDoneByVLMEvalKit", shape_rows(12, seed=21))
    root = tmp_path / tiny_card.name
    root.mkdir()
    # VLMEvalKit's infer_data_job, killed: its rank-0 file (world size 1) and a _PREV file.
    with open(root / f"01_{name}.pkl", "wb") as fh:
        pickle.dump({i: f"vlmeval says {i}" for i in range(5)}, fh)
    with open(root / f"{tiny_card.name}_{name}_PREV.pkl", "wb") as fh:
        pickle.dump({5: "prev says 5", 6: "Failed to obtain answer via API."}, fh)
    counting = Counting(vllm_engine)
    summary = runner.run_eval(tiny_card, name, work_dir=str(tmp_path), engine=counting, mode="infer")
    assert sorted(counting.asked) == list(range(6, 12))   # the failed one is retried, the rest reused
    assert summary.resumed == 6 and summary.generated == 6
    data = pd.read_excel(summary.prediction_file).set_index("index")["prediction"]
    assert [data[i] for i in range(6)] == [f"vlmeval says {i}" for i in range(5)] + ["prev says 5"]
    assert not list(root.glob("*.pkl"))   # consumed, as VLMEvalKit removes them after merging
    assert not Path(journal_path(str(tmp_path), tiny_card.name, name)).exists()
    again = Counting(vllm_engine)   # a finished run reruns from its prediction file alone
    assert runner.run_eval(tiny_card, name, work_dir=str(tmp_path), engine=again, mode="infer").resumed == 12
    assert again.asked == []


def test_vlm_batch_state_does_not_confuse_vlmevalkit(tmp_path, tiny_card, vlmeval_qwen, lmudata):
    from vlmeval.inference import infer_data_job

    name = write_dataset(lmudata, "SharedWorkDir", shape_rows(6, seed=22))
    model_dir = tmp_path / "Qwen2-VL-2B-Instruct"
    jpath = journal_path(str(tmp_path), "Qwen2-VL-2B-Instruct", name)
    j = journal.Journal(jpath, {"model": "Qwen2-VL-2B-Instruct", "dataset": name})
    j.append(Result(index=0, text="from vlm-batch"))
    j.close()
    infer_data_job(vlmeval_qwen, work_dir=str(model_dir), model_name="Qwen2-VL-2B-Instruct",
                   dataset=load_dataset(name))
    out = pd.read_excel(model_dir / f"Qwen2-VL-2B-Instruct_{name}.xlsx")
    assert list(out["prediction"]) == ["A"] * 6 and len(vlmeval_qwen.recorded) == 6
    assert Path(jpath).exists()   # left alone, in a folder VLMEvalKit does not read


# -- killed processes ---------------------------------------------------------------------------

def _finished(jpath) -> set:
    return set(journal.read(jpath)[1]) if Path(jpath).exists() else set()


@pytest.mark.engine
def test_sigkill_at_several_moments_then_resume(tmp_path, tiny_card, lmudata):
    name = write_dataset(lmudata, "KillMe", shape_rows(300, seed=23))
    args = ["--dataset", name, "--engine", "hf", "--batch-size", "4", "--mode", "infer"]
    work = tmp_path / "killed"
    jpath = journal_path(str(work), tiny_card.name, name)
    finished_before, traces = [], []

    def run_and_kill(k, when, env_extra=None):
        finished_before.append(_finished(jpath))
        traces.append(tmp_path / f"trace{k}")
        proc = Run([*args, "--work-dir", str(work)], traces[-1], env_extra)
        _wait_for(when, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    start = time.time()
    run_and_kill(0, lambda: time.time() - start > 3)                               # still starting up
    run_and_kill(1, lambda: len(_finished(jpath)) >= 40)                          # mid-generation
    stall = Path(str(jpath) + ".stalled")
    run_and_kill(2, stall.exists, {faults.STALL_JOURNAL: "20"})                      # inside a journal write
    assert Path(jpath).read_bytes()[-1:] != b"\n"                                 # a record really is torn
    run_and_kill(3, lambda: len(_finished(jpath)) >= len(finished_before[-1]) + 30)

    finished_before.append(_finished(jpath))
    traces.append(tmp_path / "trace_last")
    last = Run([*args, "--work-dir", str(work)], traces[-1])
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err[-3000:]
    assert f"resumed {len(finished_before[-1])}" in out

    for trace, done_before in zip(traces, finished_before):   # nothing finished is generated again
        assert not set(read_trace(trace)) & done_before
    assert len(finished_before[-1]) > 60

    clean = subprocess.run([sys.executable, "-m", "vlm_batch", "eval", *args, "--work-dir", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    resumed = pd.read_excel(work / tiny_card.name / f"{tiny_card.name}_{name}.xlsx")
    uninterrupted = pd.read_excel(tmp_path / "clean" / tiny_card.name / f"{tiny_card.name}_{name}.xlsx")
    pd.testing.assert_frame_equal(resumed, uninterrupted)


@pytest.mark.engine
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, tiny_card, lmudata):
    name = write_dataset(lmudata, "Interrupt", shape_rows(200, seed=24))
    args = ["--dataset", name, "--engine", "hf", "--batch-size", "4", "--mode", "infer", "--work-dir", str(tmp_path)]
    jpath = journal_path(str(tmp_path), tiny_card.name, name)
    proc = Run(args, tmp_path / "trace0")
    _wait_for(lambda: len(_finished(jpath)) >= 20, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Interrupted by SIGINT: every finished item is saved" in err
    saved = _finished(jpath)
    assert len(saved) >= 20 and Path(jpath).read_bytes().endswith(b"\n")   # closed between records
    again = Run(args, tmp_path / "trace1")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert f"resumed {len(saved)}" in out and not set(read_trace(tmp_path / "trace1")) & saved


@pytest.mark.engine
def test_vllm_engine_killed_mid_run_is_restarted(tmp_path, tiny_card, lmudata):
    import psutil

    name = write_dataset(lmudata, "KillEngine", shape_rows(160, seed=25))
    args = ["--dataset", name, "--batch-size", "1", "--mode", "infer", "--work-dir", str(tmp_path)]
    jpath = journal_path(str(tmp_path), tiny_card.name, name)
    proc = Run(args, tmp_path / "trace")
    _wait_for(lambda: len(_finished(jpath)) >= 10, proc, timeout=400)
    cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(
        [p.name(), *p.cmdline()])]
    assert cores, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
    # forked from the forkserver that imported vLLM beside the run, not spawned by the run itself
    assert all(core.ppid() != proc.pid and "forkserver" in " ".join(core.parent().cmdline()) for core in cores)
    for core in cores:
        core.kill()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "engine restarts 1" in out and "failed 0" in out
    data = pd.read_excel(tmp_path / tiny_card.name / f"{tiny_card.name}_{name}.xlsx")
    assert len(data) == 160 and not data["prediction"].astype(str).str.startswith("Failed").any()
