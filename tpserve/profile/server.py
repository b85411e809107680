"""A tpserve server for one candidate configuration: torchrun on free ports, health-checked,
stopped cleanly (SIGTERM drains; SIGKILL after a grace period); and reading its /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, taken from below the kernel's ephemeral range: a port from
    inside it (what binding port 0 gives) can be taken by an outgoing connection (gloo opens many)
    before the server binds it. Never the same port twice in one process."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, low) if low > 11000 else 0
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _GIVEN.add(port)
        return port
    raise OSError("no free port found")


def serve_script() -> Path:
    """launch/serve.py of this checkout, or of the installed package's source tree."""
    path = ROOT / "launch" / "serve.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the profiler from a tpserve checkout")
    return path


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of each process a torchrun (pid `launcher_pid`) started, read from their
    environments (Linux)."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


class ServerProcess:
    """`with ServerProcess(flags, tp, log) as s:` starts the server and waits until it serves;
    s.grpc and s.http are its addresses."""

    def __init__(self, flags: list[str], tp: int, log_path: Path, ready_timeout_s: float = 600,
                 cpus: list[int] | None = None) -> None:
        """cpus: pin the server to these cores (Linux), one OpenMP thread per core and rank."""
        self.cpus = cpus
        self.flags = flags
        self.tp = tp
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.grpc = self.http = ""

    def __enter__(self) -> ServerProcess:
        port, http_port = free_port(), free_port()
        self.grpc, self.http = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.tp),
               "--master-port", str(free_port()), str(serve_script()), "--host", "127.0.0.1", "--port", str(port),
               "--http-port", str(http_port), *self.flags]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write(" ".join(cmd) + "\n")
        self._log.flush()
        env = dict(os.environ)
        # torchrun gives every rank one OpenMP thread unless told otherwise; on CPU that would leave
        # cores idle at TP below the core count, so each rank gets its share of them.
        cores = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // self.tp)))
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     preexec_fn=pin)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        from tpserve.loadgen import wait_ready

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before serving; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")

        try:
            wait_ready(self.http, self.ready_timeout_s, alive)
        except TimeoutError:
            raise TimeoutError(f"the server did not serve within {self.ready_timeout_s:g} s; "
                               f"log:\n{self.log_tail()}") from None

    def rank_pids(self) -> dict[int, int]:
        return rank_pids(self.proc.pid)

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-n:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # torchrun forwards it; the ranks drain
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()


def scrape(http: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample on /metrics (labels other than model_name kept)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    text = httpx.get(http + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class PeakSampler:
    """Polls /metrics in a thread while a load runs: the peak KV-cache usage and queue length."""

    def __init__(self, http: str, interval_s: float = 0.25) -> None:
        self.http = http
        self.interval_s = interval_s
        self.peak_kv = 0.0
        self.peak_waiting = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = scrape(self.http)
                self.peak_kv = max(self.peak_kv, m.get("tpserve:kv_cache_usage_perc", 0.0))
                self.peak_waiting = max(self.peak_waiting, m.get("tpserve:num_requests_waiting", 0.0))
            except Exception:  # noqa: BLE001 - a missed sample only lowers the peak's resolution
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
