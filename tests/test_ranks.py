"""Rank shards: torchrun's variables, each rank's GPUs and rows, VLMEvalKit's rank files, two real ranks."""

import json
import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from vlm_batch import runner
from vlm_batch.placement.ranks import Group, RankError, Ranks, assign_devices, device_list
from vlm_batch.state import journal_path, load_progress
from vlm_batch.vlmeval import DatasetError
from vlm_batch.vlmeval.files import merge_rank_files, rank_file, write_rank_file


# -- who am I ----------------------------------------------------------------------------------------

def test_ranks_from_launcher_variables():
    assert Ranks.from_env({}) == Ranks(0, 1, 0) and not Ranks.from_env({}).distributed
    assert Ranks.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(5, 8, 1)
    # LOCAL_RANK missing: from the ranks per node, else the global rank (one node)
    assert Ranks.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}) == Ranks(5, 8, 1)
    assert Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4"}) == Ranks(3, 4, 3)


@pytest.mark.parametrize("env, said", [({"WORLD_SIZE": "2"}, "RANK is not"),
                                       ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2 is outside WORLD_SIZE 2")])
def test_inconsistent_launcher_variables_are_refused(env, said):
    with pytest.raises(RankError, match=said):
        Ranks.from_env(env)


def test_rows_are_vlmevalkits_stride_and_cover_every_row_once():
    n, world = 11, 3
    shards = [list(Ranks(r, world, r).positions(n)) for r in range(world)]
    assert shards[1] == list(range(1, n, world))   # infer_data's `range(rank, len(dataset), world_size)`
    assert sorted(p for s in shards for p in s) == list(range(n))


# -- which GPUs ----------------------------------------------------------------------------------------

def test_each_local_rank_gets_its_own_consecutive_gpus():
    assert device_list(0) == "0" and device_list(3) == "3"
    assert device_list(1, tp=2) == "2,3"
    assert device_list(1, tp=2, visible="4,5,6,7") == "6,7"       # a scheduler's share of the node
    assert device_list(1, tp=2, visible="6,7") == "6,7"           # the launcher bound this process already
    with pytest.raises(RankError, match=r"local rank 2 needs GPUs 4\.\.5 of CUDA_VISIBLE_DEVICES=0,1,2,3"):
        device_list(2, tp=2, visible="0,1,2,3")
    with pytest.raises(ValueError):
        device_list(0, tp=0)


def test_assign_devices_sets_cuda_visible_devices_only_for_ranks():
    env = {}
    assert assign_devices(Ranks(), 2, env) is None and env == {}
    assert assign_devices(Ranks(3, 4, 1), 2, env) == "2,3" and env["CUDA_VISIBLE_DEVICES"] == "2,3"


# -- meeting -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stores(world: int):
    from torch.distributed import TCPStore

    port = _free_port()
    made = {}

    def make(rank):
        made[rank] = TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=30))

    threads = [threading.Thread(target=make, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [made[r] for r in range(world)]


def test_a_failed_rank_ends_the_wait_naming_the_rank_and_its_cause():
    stores = _stores(2)
    with Group(Ranks(0, 2, 0), stores[0]) as zero, Group(Ranks(1, 2, 1), stores[1]) as one:
        zero.announce("infer", {"generated": 3})
        one.announce("infer", error=MemoryError("CUDA out of memory on item 17"))
        with pytest.raises(RankError, match="rank 1 failed: MemoryError: CUDA out of memory on item 17"):
            zero.wait("infer")
        assert one.wait("infer", ranks=[0]) == [{"error": None, "generated": 3}]


def test_a_rank_that_never_reports_is_named_when_the_wait_times_out():
    stores = _stores(2)
    with Group(Ranks(0, 2, 0), stores[0]) as zero:
        zero.announce("infer")
        with pytest.raises(RankError, match=r"ranks \[1\] did not finish 'infer' within 1s"):
            zero.wait("infer", timeout=1)


def test_one_process_needs_no_meeting():
    with Group(Ranks()) as group:
        assert group.wait("infer") == [] and group.first("x", lambda: 7) == 7


# -- VLMEvalKit's rank files -------------------------------------------------------------------------

def test_rank_files_are_what_vlmevalkits_infer_data_leaves(tmp_path, shapes):
    from vlmeval.smp import load

    world = 2
    answers = {}
    for rank in range(world):
        rows = Ranks(rank, world, rank).positions(len(shapes.data))
        predictions = {i: f"answer {i}" for i in shapes.data["index"].iloc[list(rows)]}
        path = rank_file(str(tmp_path), "m", shapes.dataset_name, rank, world)
        assert Path(path).name == f"{rank}{world}_{shapes.dataset_name}.pkl"
        write_rank_file(shapes, rows, predictions, path)
        assert load(path) == predictions   # VLMEvalKit's own loader reads it back unchanged
        answers.update(predictions)
    assert merge_rank_files(shapes, str(tmp_path), "m", world) == answers
    os.remove(rank_file(str(tmp_path), "m", shapes.dataset_name, 1, world))
    with pytest.raises(DatasetError, match=r"rank 1 of 2 left no predictions \(.*12_VLMBatch"):
        merge_rank_files(shapes, str(tmp_path), "m", world)


def test_merging_names_the_rows_a_rank_did_not_answer(tmp_path, shapes):
    for rank in range(2):
        rows = list(Ranks(rank, 2, rank).positions(len(shapes.data)))
        if rank == 1:
            rows = rows[1:]   # the first row of rank 1 (position 1) is missing
        predictions = {i: "A" for i in shapes.data["index"].iloc[rows]}
        write_rank_file(shapes, rows, predictions,
                                       rank_file(str(tmp_path), "m", shapes.dataset_name, rank, 2))
    missing = shapes.data["index"].iloc[1]
    with pytest.raises(DatasetError, match=rf"no prediction for items \[{missing}\] \(ranks \[1\] of 2"):
        merge_rank_files(shapes, str(tmp_path), "m", 2)


def test_journals_of_every_rank_count_when_resuming(tmp_path, tiny_card):
    from vlm_batch.journal import Journal
    from vlm_batch.request import Result

    for rank, index in ((0, 10), (1, 11)):
        path = journal_path(str(tmp_path), tiny_card.name, "Set", Ranks(rank, 2, rank))
        assert path.endswith(f"tiny-qwen2-vl_Set.rank{rank}of2.journal")
        j = Journal(path, {"model": tiny_card.name, "dataset": "Set"})
        j.append(Result(index=index, text=f"from rank {rank}"))
        j.close()
    answers, _ = load_progress(str(tmp_path), tiny_card.name, "Set")   # a single process resumes both
    assert answers == {10: "from rank 0", 11: "from rank 1"}


# -- two real ranks ----------------------------------------------------------------------------------

@pytest.mark.engine
def test_two_ranks_merge_every_dataset_into_the_single_process_prediction_files(tmp_path, tiny_card, lmudata):
    from helpers import shape_rows, write_dataset

    n = 12
    rows = shape_rows(10, seed=61, first=700)
    for long in rows[2:4]:   # one over-long prompt in each rank's share: --truncate cuts both
        long["hint"] = "the weather report says it may rain later today " * 400
    second = write_dataset(lmudata, "RanksSecond", rows)
    names = ["VLMBatchShapes", second]
    singles = [runner.run_eval(tiny_card, d, work_dir=str(tmp_path / "single"), engine="hf", limit=n, truncate=True)
               for d in names]
    assert [s.truncated for s in singles] == [0, 2]
    port = _free_port()
    work = tmp_path / "ranks"
    procs = []
    for rank in range(2):   # output to files: a full pipe nobody reads yet would stall a rank, and both
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        with open(tmp_path / f"out{rank}", "w") as out, open(tmp_path / f"err{rank}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "vlm_batch", "eval", "--engine", "hf", "--limit",
                                           str(n), "--dataset", *names, "--work-dir", str(work), "--truncate"],
                                          env=env, stdout=out, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    model_dir = work / tiny_card.name
    for rank, p in enumerate(procs):
        out, err = (tmp_path / f"out{rank}").read_text(), (tmp_path / f"err{rank}").read_text()
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        # every rank prints the whole run's summary, scored once by rank 0
        assert f"items {n}: generated {n}, resumed 0, failed 0" in out, out
        assert "items 10: generated 10, resumed 0, failed 0, truncated 2" in out, out   # both ranks' cuts
        assert out.count("Overall") == 2
        for d in names:
            assert f"rank {rank} of 2 wrote {rank}2_{d}.pkl" in err, err[-2000:]
    for d, single in zip(names, singles):
        merged = pd.read_excel(model_dir / f"{tiny_card.name}_{d}.xlsx")
        pd.testing.assert_frame_equal(merged, pd.read_excel(single.prediction_file))
        report = json.loads((model_dir / f"{tiny_card.name}_{d}_run.json").read_text())
        half = len(merged) // 2
        assert [(r["rank"], r["generated"]) for r in report["engine"]["ranks"]] == [(0, half), (1, half)]
        assert report["generated"] == len(merged) and report["score"] == json.loads(
            Path(single.report_file).read_text())["score"]
        assert report["truncated"] == single.truncated
    # merged, then removed with the journals and locks, as infer_data_job removes its rank files
    assert not list(model_dir.glob("[01]2_*.pkl*")) and not list((model_dir / ".vlm-batch").glob("*.journal"))
    assert not list((model_dir / ".vlm-batch").glob("*.lock"))
    assert (work / "summary.csv").exists()
