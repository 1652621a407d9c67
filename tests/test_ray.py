"""Ray Data: replicas on a local Ray cluster give the single-process answers, even when one is killed."""

import os
from pathlib import Path
import signal
import threading
import time

import pandas as pd
import pytest

from vlm_batch import journal, runner
from vlm_batch.placement.ray import RayOptions, RayRunError, plan_cpus
from vlm_batch.state import journal_path

N = 40
BATCH = 4   # rows a replica takes at a time: small, so both replicas get work and a kill lands mid-run


def test_cpu_plan_fits_the_cluster_and_keeps_preparation_apart():
    assert plan_cpus(16, 4) == (1.0, 0.5)
    replica, prep = plan_cpus(2, 2)   # the test cluster: both replicas and a preparation task fit
    assert 2 * replica + prep <= 2 and replica != prep
    replica, prep = plan_cpus(1.5, 2)   # an equal share would be 0.5, which would fuse the stages
    assert 2 * replica + prep <= 1.5 and replica != prep
    with pytest.raises(RayRunError, match="too few for 4 replicas"):
        plan_cpus(0.5, 4)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_card, tmp_path_factory):
    """The reference: one process, the same engine, the same rows."""
    work = tmp_path_factory.mktemp("single")
    return runner.run_eval(tiny_card, "VLMBatchShapes", work_dir=str(work), engine="hf", limit=N)


def test_a_remote_failure_is_reported_by_the_error_the_remote_code_raised(ray_cluster):
    from vlm_batch.placement.ray import root_cause

    @ray_cluster.remote
    def load():
        try:
            raise OSError("no such checkpoint: /models/x")
        except OSError as exc:
            raise RuntimeError("the engine could not start: OSError: no such checkpoint: /models/x") from exc

    with pytest.raises(Exception) as caught:
        ray_cluster.get(load.remote())
    expected = "RuntimeError: the engine could not start: OSError: no such checkpoint: /models/x"
    assert root_cause(caught.value) == expected


def _replica_processes():
    """This test's replica actors: processes under our local Ray cluster, named after the class."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "MapBatches(Replica)" in " ".join(p.cmdline())]


@pytest.mark.engine
def test_replicas_give_the_single_process_predictions_and_summary(ray_cluster, tiny_card, single, tmp_path):
    summary = runner.run_eval(tiny_card, "VLMBatchShapes", work_dir=str(tmp_path), engine="hf", limit=N,
                              ray=RayOptions(replicas=2, batch_rows=BATCH))
    pd.testing.assert_frame_equal(pd.read_excel(summary.prediction_file), pd.read_excel(single.prediction_file))
    assert (summary.items, summary.generated, summary.resumed, summary.failed) == (N, N, 0, {})
    assert summary.output_tokens == single.output_tokens and summary.engine == "hf"
    assert summary.score.equals(single.score)
    stats = summary.engine_stats["ray"]
    assert sum(stats["answered_by"].values()) == N and stats["duplicates"] == 0
    assert 0 < summary.infer_s < stats["pipeline_s"]   # generation, counted once a replica was ready
    # prompts and images were made by CPU tasks, not inside the replicas
    assert stats["prepared_by"] and not set(stats["prepared_by"]) & set(stats["answered_by"])


@pytest.mark.engine
def test_replicas_take_every_dataset_of_a_suite(ray_cluster, tiny_card, single, tmp_path, lmudata):
    """Two datasets through one pipeline of replicas: each equals its own single-process run."""
    from helpers import shape_rows, write_dataset
    from vlm_batch.settings import Settings
    from vlm_batch.plan import DatasetSpec, ModelSpec, Plan
    from vlm_batch.suite import run_suite

    second = write_dataset(lmudata, "RaySecond", shape_rows(12, seed=60, first=300))
    alone = runner.run_eval(tiny_card, second, work_dir=str(tmp_path / "alone"), engine="hf")
    plan = Plan([ModelSpec(tiny_card, "hf")], [DatasetSpec("VLMBatchShapes"), DatasetSpec(second)])
    result = run_suite(plan, Settings(work_dir=str(tmp_path / "ray"), limit=N,
                                      ray=RayOptions(replicas=2, batch_rows=BATCH)))
    first, other = result.summaries
    pd.testing.assert_frame_equal(pd.read_excel(first.prediction_file), pd.read_excel(single.prediction_file))
    pd.testing.assert_frame_equal(pd.read_excel(other.prediction_file), pd.read_excel(alone.prediction_file))
    assert (first.generated, other.generated) == (N, 12) and first.score.equals(single.score)
    assert other.score.equals(alone.score)


@pytest.mark.engine
def test_a_killed_replica_still_ends_with_every_item_answered_once(ray_cluster, tiny_card, single, tmp_path):
    jpath = journal_path(str(tmp_path), tiny_card.name, "VLMBatchShapes")
    killed = []

    def kill_one_replica_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline:
            done = len(journal.read(jpath)[1]) if os.path.exists(jpath) else 0
            if done >= 2 * BATCH:
                replicas = _replica_processes()
                if replicas:
                    replicas[0].send_signal(signal.SIGKILL)
                    killed.append((replicas[0].pid, done))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_replica_mid_run, daemon=True)
    watcher.start()
    summary = runner.run_eval(tiny_card, "VLMBatchShapes", work_dir=str(tmp_path), engine="hf", limit=N,
                              ray=RayOptions(replicas=2, batch_rows=BATCH))
    watcher.join(timeout=5)
    import psutil

    assert killed and killed[0][1] < N, f"no replica was killed mid-run: {killed}"
    assert not psutil.pid_exists(killed[0][0])
    data = pd.read_excel(summary.prediction_file)
    assert data["index"].is_unique and len(data) == N
    pd.testing.assert_frame_equal(data, pd.read_excel(single.prediction_file))
    assert (summary.generated, summary.failed) == (N, {})
    assert sum(summary.engine_stats["ray"]["answered_by"].values()) == N


@pytest.mark.engine
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path, tiny_card, lmudata):
    """`kill -9` of a `--ray` run that started its own local cluster: the cluster's processes (GCS,
    raylet, workers, the replicas' engines) and our own go with it."""
    pytest.importorskip("ray.data")
    from test_ending import Family

    from helpers import Run, shape_rows, wait_for, write_dataset

    name = write_dataset(lmudata, "RayKilled", shape_rows(1500, seed=34))
    work = tmp_path / "out"
    jpath = journal_path(str(work), tiny_card.name, name)
    proc = Run(["--dataset", name, "--engine", "hf", "--ray", "--replicas", "1", "--mode", "infer",
                "--work-dir", str(work)], tmp_path / "trace")
    family = Family(proc.pid)
    wait_for(lambda: Path(jpath).exists() and len(journal.read(jpath)[1]) >= 16, proc, timeout=600)
    family.snapshot()
    assert family.any("raylet") and family.any("Replica"), list(family.seen.values())
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    left = family.left_running()
    assert not left, left
