"""Stage costs: a stage timed inside another is its own, and the outer one is charged the rest."""

import threading
import time

from vlm_batch.stages import Costs, Ledger


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_an_inner_stage_is_not_charged_to_the_outer_one():
    costs = Costs()
    with costs.stage("prompt"):
        _spin(0.02)
        with costs.stage("dump"):
            _spin(0.06)
    taken = costs.take()
    assert 0.06 <= taken["dump"][0] < 0.075
    assert 0.02 <= taken["prompt"][0] < 0.035   # not 0.08: the dump inside is the dump's
    assert taken["prompt"][1] == taken["dump"][1] == 1 and costs.take() == {}


def test_stages_in_other_threads_do_not_nest_in_this_ones():
    costs = Costs()
    with costs.stage("submit"):
        def dump():
            with costs.stage("dump"):
                _spin(0.05)

        worker = threading.Thread(target=dump)
        worker.start()
        worker.join()
        _spin(0.02)
    taken = costs.take()
    assert 0.02 <= taken["submit"][0] < 0.035 and 0.05 <= taken["dump"][0] < 0.065


def test_the_ledger_reports_ms_per_item_by_process():
    ledger = Ledger()
    ledger.add({"dump": (0.5, 10)}, "preparation workers")
    ledger.add({"dump": (0.1, 10), "journal": (0.002, 2)}, "this process")
    assert ledger.report() == {"dump": {"preparation workers": 50.0, "this process": 10.0},
                               "journal": {"this process": 1.0}}
