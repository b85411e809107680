"""The stall watchdog's bound and firing, the engine loop under it (a stalled step fails every open
request, heartbeats keep flowing while commands arrive), and a request whose logits turn
non-finite failing alone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.fake_engine import greedy_reference
from tests.unit.test_serving_core import GREEDY, Served, wait_until
from tpserve.distributed import watchdog as wd
from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import ComputeError, Unavailable


def test_step_bound_adapts_after_warmup_within_its_floor_and_ceiling():
    bound = wd.StepBound()
    assert bound.seconds() == wd.MAX_STEP_TIMEOUT_S  # before warm-up: the ceiling
    for _ in range(wd.WARMUP_STEPS):
        bound.observe(0.01)
    assert bound.seconds() == wd.MIN_STEP_TIMEOUT_S  # 20 x 10 ms is under the floor
    bound.observe(0.55)
    assert bound.seconds() == pytest.approx(wd.STEP_TIMEOUT_FACTOR * 0.55)
    for _ in range(1000):
        bound.observe(0.01)
    assert bound.seconds() == pytest.approx(wd.STEP_TIMEOUT_FACTOR * 0.55)  # the longest so far counts
    bound.observe(5.0)
    assert bound.seconds() == wd.MAX_STEP_TIMEOUT_S
    assert wd.worker_bound_s(wd.MAX_STEP_TIMEOUT_S) <= 30  # a stopped rank 0, detected within 30 s
    fixed = wd.StepBound(3.0)
    fixed.observe(100.0)
    assert fixed.seconds() == fixed.ceiling_s == 3.0
    with pytest.raises(ValueError, match="--step-timeout must be > 0 seconds, got 0"):
        wd.StepBound(0)


def test_watchdog_fires_once_an_activity_outlives_its_bound_and_kills_its_peers():
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(peer.pid, signal.SIGSTOP)  # a stopped peer yields only to SIGKILL
    exits, stalls = [], []
    dog = wd.Watchdog("rank 0", lambda: 0.3, stalls.append, (peer.pid, os.getpid()), poll_s=0.02,
                      exit=exits.append).start()
    try:
        dog.begin("engine step 1")
        time.sleep(0.1)
        dog.end()  # ended in time: nothing happens
        time.sleep(0.5)
        assert not exits and not stalls
        started = time.monotonic()
        dog.begin("engine step 2")
        wait_until(lambda: exits, timeout=5)
        assert time.monotonic() - started >= 0.3
        assert exits == [wd.STALL_EXIT_CODE]
        assert "engine step 2 made no progress" in stalls[0] and "bound 0.3 s" in stalls[0]
        assert peer.wait(timeout=5) == -signal.SIGKILL
    finally:
        dog.stop()
        if peer.poll() is None:
            peer.kill()


def test_a_stalled_step_fails_open_requests_with_unavailable():
    served = Served()
    stalls = []

    def on_stall(message):
        stalls.append(message)
        served.door.stalled(message)

    dog = wd.Watchdog("rank 0", lambda: 0.5, on_stall, poll_s=0.02, exit=lambda code: None)
    served.door.watchdog = dog.start()
    served.start()
    try:
        async def go():
            outs = []
            async for out in served.core.generate("s", None, [4, 5], SamplingParams(max_tokens=200, **GREEDY)):
                outs.append(out)
                if len(outs) == 3:
                    served.engine.driver.stall.set()  # the next step never returns: a stopped rank
            return outs

        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"the server failed: stall: rank 0: engine step \d+ made no progress"):
            asyncio.run(go())
        assert time.monotonic() - started < 10  # the watchdog, not a deadline, ended it
        assert not served.core.ready() and "has failed" in served.state.unavailable_reason()
    finally:
        dog.stop()
        served.engine.driver.stall.clear()
        served._thread.join(10)


def test_heartbeats_keep_flowing_while_commands_arrive_without_work():
    served = Served().start()  # heartbeat_s 0.05
    try:
        stop = threading.Event()

        def abort_unknown_ids():  # commands that make no work
            while not stop.is_set():
                served.door._commands.put(("abort", "nobody"))
                time.sleep(0.01)

        thread = threading.Thread(target=abort_unknown_ids, daemon=True)
        thread.start()
        time.sleep(0.5)
        stop.set()
        thread.join()
        assert served.engine.driver.num_heartbeats >= 4
    finally:
        assert served.stop() == 0


def test_a_request_whose_logits_turn_nonfinite_fails_alone():
    served = Served()
    driver = served.engine.driver
    step = driver.step
    poisoned = {}

    def step_with_nan(plan):  # the second request's logit row turns NaN at its 5th output token
        logits = step(plan)
        row = 0
        for work in plan.seqs:
            if not work.sample:
                continue
            if work.seq_id == poisoned.get("seq_id") and work.num_computed_tokens >= 6:
                logits[row] = torch.nan
            row += work.num_logits
        return logits

    driver.step = step_with_nan
    served.start()
    try:
        async def go():
            healthy = served.core.generate("ok", None, [4, 5], SamplingParams(max_tokens=30, **GREEDY))
            bad = served.core.generate("bad", None, [7, 8], SamplingParams(max_tokens=30, **GREEDY))
            poisoned["seq_id"] = 1
            async def collect(gen):
                return [out async for out in gen]
            return await asyncio.gather(collect(healthy), collect(bad), return_exceptions=True)

        healthy, bad = asyncio.run(go())
        assert isinstance(bad, ComputeError) and bad.kind == "internal"
        assert "logits for this request are not finite" in str(bad) and "after 5 output tokens" in str(bad)
        assert [t for o in healthy for t in o.new_token_ids] == greedy_reference([4, 5], 30)
        wait_until(lambda: served.door.stats.kv_blocks_in_use == 0)
        again = served.collect("again", [7, 8], max_tokens=10, **GREEDY)  # the server goes on
        assert [t for o in again for t in o.new_token_ids] == greedy_reference([7, 8], 10)
    finally:
        assert served.stop() == 0
    assert served.engine.leftovers() == {}


def test_a_scoring_request_whose_logits_turn_nonfinite_fails_and_caches_nothing():
    served = Served()
    driver = served.engine.driver
    step = driver.step

    def step_with_nan(plan):  # every logit row of the scoring request turns NaN
        logits = step(plan)
        row = 0
        for work in plan.seqs:
            if not work.sample:
                continue
            if work.seq_id == 0:
                logits[row : row + work.num_logits] = torch.nan
            row += work.num_logits
        return logits

    driver.step = step_with_nan
    served.start()
    try:
        with pytest.raises(ComputeError, match="not finite"):
            served.collect("score", [4, 5, 6, 7, 8, 9, 10, 11, 12], max_tokens=0, prompt_logprobs=1)
        wait_until(lambda: served.door.stats.kv_blocks_in_use == 0)
        assert served.door.stats.kv_blocks_cached == 0  # its K/V did not enter the prefix cache
    finally:
        assert served.stop() == 0
    assert served.engine.leftovers() == {}


def test_mark_nonfinite_finds_nan_and_infinity_rows_but_not_a_sum_that_overflows():
    from types import SimpleNamespace

    from tpserve.engine.engine import mark_nonfinite

    items = [SimpleNamespace(num_logit_rows=n, nonfinite=False) for n in (1, 2, 1, 1)]
    logits = torch.zeros(5, 16)
    logits[0, :] = 3e38  # finite, but their sum overflows to inf
    logits[2, 3] = float("inf")  # item 1's second row
    logits[4, 0] = float("nan")  # item 3
    logits[3, 5] = -3e38
    failed = mark_nonfinite(SimpleNamespace(scheduled=items), logits)
    assert failed == [items[1], items[3]] and [i.nonfinite for i in items] == [False, True, False, True]
    clean = [SimpleNamespace(num_logit_rows=1, nonfinite=False) for _ in range(2)]
    assert mark_nonfinite(SimpleNamespace(scheduled=clean), torch.full((2, 16), 3e38)) == []
