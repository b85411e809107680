"""Two torchrun agents (`--nnodes 2`, node ranks 0 and 1, c10d rendezvous on 127.0.0.1), one rank
each, serve one tensor-parallel group: readiness, greedy output equal to the single-node 2-rank
server, and killing node 1's agent ends the whole group within the watchdog bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_harness import free_port
from tests.server_proc import ROOT, ServerProc
from tests.tiny_models import build_tiny_model_with_tokenizer
from tpserve.client import Client

pytestmark = pytest.mark.slow
PROMPTS = [[5, 6, 7, 8], list(range(40, 90)), [1000 + 7 * i for i in range(13)]]
BOUND_S = 30.0


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return build_tiny_model_with_tokenizer(tiny_dir)


def greedy(address: str) -> list[list[int]]:
    with Client(address, 60) as c:
        return [c.generate(p, max_tokens=24, temperature=0.0, ignore_eos=True).token_ids for p in PROMPTS]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_two_agents_serve_one_group(model_dir, tmp_path):
    single = ServerProc(model_dir, tmp_path / "single.log", extra=["--num-kv-blocks", "128"])
    try:
        single.wait_ready()
        want = greedy(single.address)
    finally:
        single.close()

    rdzv, port, http_port = free_port(), free_port(), free_port()
    agents, logs = [], []
    started = time.monotonic()
    for node_rank in (0, 1):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
               "--rdzv-id", "two-nodes", str(ROOT / "launch" / "serve.py"), "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port), "--dtype", "float32",
               "--num-kv-blocks", "128"]
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
    probe = ServerProc.__new__(ServerProc)  # only its health polling, against the group's rank 0
    import grpc

    probe.channel, probe.proc = grpc.insecure_channel(f"127.0.0.1:{port}"), agents[0]
    probe.log, probe.log_path, probe.seen_ranks = logs[0], tmp_path / "node0.log", set()
    ranks = {}
    try:
        deadline = time.monotonic() + 180
        while probe.health() != 1:
            assert time.monotonic() < deadline, (tmp_path / "node0.log").read_text()[-3000:]
            for agent, log in zip(agents, logs):
                assert agent.poll() is None, f"an agent exited: {(tmp_path / 'node0.log').read_text()[-2000:]}" \
                                             f"\n{(tmp_path / 'node1.log').read_text()[-2000:]}"
            time.sleep(0.1)
        startup_s = time.monotonic() - started
        for node_rank, agent in enumerate(agents):
            out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
            ranks[node_rank] = [int(pid) for pid in out]
        got = greedy(f"127.0.0.1:{port}")
        assert got == want
        killed = time.monotonic()
        os.kill(agents[1].pid, signal.SIGKILL)  # node 1's agent, and with it (PDEATHSIG) its rank
        code = agents[0].wait(BOUND_S + 15)
        gone_s = time.monotonic() - killed
        deadline = time.monotonic() + 10
        while any(alive(pid) for pids in ranks.values() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pids in ranks.values() for pid in pids if alive(pid)]
        print(json.dumps({"startup_s": round(startup_s, 1), "outputs_equal": got == want,
                          "group_gone_after_kill_s": round(gone_s, 2), "node0_exit": code}))
        assert code != 0 and gone_s <= BOUND_S and not left, (code, gone_s, left)
    finally:
        probe.channel.close()
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
        for pids in ranks.values():
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        for log in logs:
            log.close()
