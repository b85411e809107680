"""launch/slurm/serve.sbatch on an emulated two-node allocation: stub `srun` and `scontrol`
executables on PATH make this machine both nodes (127.0.0.1 twice), one CPU rank per node, so the
script's real torchrun command line forms one 2-rank tensor-parallel group through the c10d
rendezvous on the "first node". The group serves greedy tokens equal to transformers', SIGTERM to
srun drains an in-flight request and every process exits, and a killed rank ends the job on every
node (--kill-on-bad-exit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.dist_harness import free_port
from tests.tiny_models import build_tiny_model_with_tokenizer, load_hf
from tpserve.client import Client, build_request
from tpserve.v1 import generation_pb2 as pb

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "serve.sbatch"
READINESS = "tpserve.v1.Generation"
NODES = 2

# srun: runs its command once per node (SLURM_NNODES), each with the task variables srun sets.
# Like slurmstepd's process tracking it knows every process a task starts, ranks in sessions of
# their own included: it is a child subreaper, so orphans re-parent to it and stay in its tree.
# It forwards SIGTERM/SIGINT to the tasks; with --kill-on-bad-exit a task exiting non-zero gets
# every other process of the step SIGKILLed. It exits with the first non-zero task status.
# Events (start, exit, kill) go to $SRUN_STUB_LOG as JSON lines.
SRUN = r'''#!PYTHON
import ctypes, json, os, signal, subprocess, sys, time

log = open(os.environ["SRUN_STUB_LOG"], "a", buffering=1)
def event(**kw):
    log.write(json.dumps(dict(kw, time=time.time())) + "\n")

argv, kill_on_bad_exit = sys.argv[1:], False
while argv and argv[0].startswith("-"):
    opt = argv.pop(0)
    if opt in ("-K", "--kill-on-bad-exit", "--kill-on-bad-exit=1", "-K1"):
        kill_on_bad_exit = True
if not argv:
    sys.exit("srun stub: no command")
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

def descendants():
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out

nnodes = int(os.environ.get("SLURM_NNODES", "1"))
tasks = {}
for node in range(nnodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_NTASKS=str(nnodes), SLURM_STEP_NUM_NODES=str(nnodes))
    proc = subprocess.Popen(argv, env=env)
    tasks[proc.pid] = proc
    event(event="start", node=node, pid=proc.pid)

def forward(signum, frame):
    event(event="signal", signal=signum)
    for pid, proc in tasks.items():
        if proc.returncode is None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)

status = 0
while any(p.returncode is None for p in tasks.values()):
    pid, raw = os.waitpid(-1, 0)
    if pid not in tasks:
        continue  # an orphan re-parented to us
    code = os.waitstatus_to_exitcode(raw)
    code = 128 - code if code < 0 else code
    tasks[pid].returncode = code
    event(event="exit", pid=pid, code=code)
    if code != 0 and status == 0:
        status = code
        if kill_on_bad_exit:
            victims = descendants()
            event(event="kill", pids=victims)
            for victim in victims:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
sys.exit(status)
'''

SCONTROL = r'''#!/usr/bin/env bash
# scontrol show hostnames LIST: one host per line; LIST is comma-separated (no bracket ranges).
if [ "${1:-} ${2:-}" = "show hostnames" ]; then
  tr ',' '\n' <<< "${3:-$SLURM_JOB_NODELIST}"
  exit 0
fi
echo "scontrol stub: unsupported: $*" >&2
exit 2
'''


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return build_tiny_model_with_tokenizer(tiny_dir)


class SlurmJob:
    """bash launch/slurm/serve.sbatch under the stubs; self.proc is srun (the script execs it)."""

    def __init__(self, tmp: Path, model_dir: Path) -> None:
        if not (ROOT / ".venv" / "bin" / "torchrun").is_file():
            pytest.skip("serve.sbatch runs .venv/bin/torchrun: no .venv in the repository (scripts/install.sh)")
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text(SRUN.replace("PYTHON", sys.executable, 1))
        (bin_dir / "scontrol").write_text(SCONTROL)
        for stub in ("srun", "scontrol"):
            (bin_dir / stub).chmod(0o755)
        self.port, self.http_port = free_port(), free_port()
        self.events_path = tmp / "srun.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
                   SLURM_NNODES=str(NODES), SLURM_JOB_ID="4242", TPSERVE_NPROC_PER_NODE="1",
                   TPSERVE_RDZV_PORT=str(free_port()), SRUN_STUB_LOG=str(self.events_path), OMP_NUM_THREADS="1")
        self.log_path = tmp / "job.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["bash", str(SBATCH), "--model", str(model_dir), "--dtype", "float32", "--host", "127.0.0.1",
             "--port", str(self.port), "--http-port", str(self.http_port), "--num-kv-blocks", "64"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.seen: set[int] = set()

    def tail(self, n: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def wait_ready(self, timeout: float = 300.0) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=1.0).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout}s:\n{self.tail()}")

    def ranks(self) -> dict[int, tuple[int, str]]:
        """RANK -> (pid, SLURM_NODEID) of every rank process below srun."""
        out = {}
        for pid in descendants(self.proc.pid):
            try:
                env = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"RANK" in env and b"launch/serve.py" in cmdline and b"torchrun" not in cmdline.split(b"\0")[0]:
                out[int(env[b"RANK"])] = (pid, env.get(b"SLURM_NODEID", b"?").decode())
        self.seen.update(pid for pid, _ in out.values())
        return out

    def close(self) -> None:
        self.channel.close()
        for pid in [self.proc.pid, *descendants(self.proc.pid), *self.seen]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.log.close()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    hf = load_hf(model_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_two_node_job_serves_greedy_and_drains_on_sigterm(model_dir, tmp_path):
    job = SlurmJob(tmp_path, model_dir)
    try:
        job.wait_ready()
        ranks = job.ranks()
        # One rank per emulated node: the script's --nnodes / --nproc-per-node reached torchrun.
        assert sorted(ranks) == [0, 1], ranks
        assert sorted(node for _, node in ranks.values()) == ["0", "1"], ranks
        assert "tpserve: 2 nodes x 1 ranks, rendezvous at 127.0.0.1:" in job.tail()

        prompt = [5, 17, 300, 42, 7, 1000]
        with Client(job.address) as c:
            got = c.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
            assert got.token_ids == hf_greedy(model_dir, prompt, 16)

            # SIGTERM to srun while a request streams: it finishes, then every process exits.
            stream = c.stub.Generate(build_request([6, 7], True, max_tokens=150, temperature=0.0, ignore_eos=True))
            first = next(stream)
            job.proc.send_signal(signal.SIGTERM)
            rest = list(stream)
            completed_at = time.time()
        tokens = list(first.chunk.token_ids) + [t for r in rest if r.HasField("chunk") for t in r.chunk.token_ids]
        assert rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 150
        code = job.proc.wait(timeout=90)
        events = job.events()
        assert [e["signal"] for e in events if e["event"] == "signal"] == [int(signal.SIGTERM)], events
        assert "drained; shutting down" in job.tail(20000)
        # torchrun exits 1 after forwarding a SIGTERM, even when its ranks drained and exited 0, so
        # --kill-on-bad-exit may end what is left on the other node; but only after the drain.
        assert all(e["time"] >= completed_at for e in events if e["event"] == "kill"), (completed_at, events)
        assert code in (0, 1), f"srun exited {code}:\n{job.tail()}"
        torchruns = [e["pid"] for e in events if e["event"] == "start"]
        assert len(torchruns) == NODES, events
        assert wait_gone([*job.seen, *torchruns], 30) == [], f"left: {job.seen}\n{job.tail()}"
    finally:
        job.close()


def test_a_killed_rank_ends_the_job_on_every_node(model_dir, tmp_path):
    job = SlurmJob(tmp_path, model_dir)
    try:
        job.wait_ready()
        ranks = job.ranks()
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1][0], signal.SIGKILL)
        code = job.proc.wait(timeout=120)
        assert code != 0, job.tail()
        assert wait_gone(job.seen, 30) == [], f"ranks left: {job.seen}\n{job.tail()}"
        exits = [e for e in job.events() if e["event"] == "exit"]
        assert len(exits) == NODES and any(e["code"] != 0 for e in exits), job.events()
    finally:
        job.close()
