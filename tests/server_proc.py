"""Start and stop a real tpserve server (torchrun, gloo ranks) on loopback for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.dist_harness import free_port
from tpserve.profile.server import rank_pids

ROOT = Path(__file__).resolve().parent.parent
READINESS = "tpserve.v1.Generation"


class ServerProc:
    def __init__(self, model_dir, log_path, nproc: int = 2, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), str(ROOT / "launch" / "serve.py"), "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--http-port", str(self.http_port), "--dtype", "float32",
               *(extra or [])]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.channel = grpc.insecure_channel(self.address)
        self.seen_ranks: set[int] = set()  # pids of every rank seen, killed by close()

    def health(self, service: str = READINESS, timeout: float = 1.0):
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None

    def wait_ready(self, timeout: float = 180.0, seen: list | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.health()
            if seen is not None and status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                self.rank_pids()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def rank_pids(self) -> dict[int, int]:
        """RANK -> pid of each worker process torchrun started."""
        ranks = rank_pids(self.proc.pid)
        self.seen_ranks.update(ranks.values())
        return ranks

    def signal_ranks(self, sig: int) -> None:
        for pid in self.rank_pids().values():
            os.kill(pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def close(self) -> None:
        """Kill torchrun and every rank (the ranks run in sessions of their own, out of reach of a
        signal to torchrun's process group)."""
        self.channel.close()
        if self.proc.poll() is None:
            self.rank_pids()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for pid in self.seen_ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
