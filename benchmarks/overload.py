"""Overload: offer several times the measured capacity for a minute and see what the server does.

    python benchmarks/overload.py [--factor 3] [--seconds 60] [--max-queued-requests 32] [--out FILE]

Starts the bundled model under torchrun (2 CPU ranks unless --nproc) with a waiting-queue limit,
measures its capacity (completed requests/s with `--max-num-seqs` closed-loop clients), then
offers `--factor` times that as Poisson arrivals for `--seconds`, half over gRPC and half over
HTTP. Reports how many were refused (RESOURCE_EXHAUSTED / 429) and how fast (p50 / p99 time to
refuse), whether every admitted request completed (any other failure counts), the most requests
seen waiting (bounded by the queue limit), and each rank's resident memory before, at its peak
during, and after the overload.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from pathlib import Path

from common import machine_info, print_table, write_json
from soak import rss_mib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tpserve.profile.server import ServerProcess  # noqa: E402


def server_flags(args) -> list[str]:
    flags = ["--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs), "--max-queued-requests",
             str(args.max_queued_requests)]
    return flags + (["--model", args.model] if args.model else [])


def workload(n: int, seed: int, prompt_tokens: int, max_tokens: int, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab_size) for _ in range(prompt_tokens)], max_tokens) for _ in range(n)]


class Sampler:
    """Every 0.25 s: each rank's RSS, and the waiting count from GetServerInfo."""

    def __init__(self, grpc_target: str, pids: dict[int, int]) -> None:
        import grpc

        from tpserve.v1 import generation_pb2_grpc as pb_grpc

        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(grpc_target))
        self.pids = pids
        self.rss_peak = {r: 0.0 for r in pids}
        self.max_waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from tpserve.v1 import generation_pb2 as pb

        while not self._stop.wait(0.25):
            for r, pid in self.pids.items():
                self.rss_peak[r] = max(self.rss_peak[r], rss_mib(pid))
            try:
                info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
                self.max_waiting = max(self.max_waiting, info.num_waiting_requests)
            except Exception:  # noqa: BLE001 (a slow answer under load is not a measurement)
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def offered(grpc_target: str, http_url: str, work, rate: float, seed: int):
    """Poisson arrivals at `rate`, alternating gRPC and HTTP; a failure other than a refusal is
    recorded with its request instead of raised, so that one does not hide the rest."""
    from tpserve.loadgen import connect

    rng = random.Random(seed)
    async with connect(grpc_target) as over_grpc, connect(http_url) as over_http:
        async def guarded(send, prompt, n, protocol):
            try:
                return {**await send(prompt, n), "protocol": protocol}
            except Exception as e:  # noqa: BLE001
                return {"rejected": False, "failed": f"{type(e).__name__}: {e}", "protocol": protocol}

        tasks = []
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(work):
            protocol = "grpc" if i % 2 == 0 else "http"
            tasks.append(asyncio.create_task(guarded(over_grpc if i % 2 == 0 else over_http, prompt, n, protocol)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - started


def main() -> int:
    from tpserve.loadgen import pct, run_load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-queued-requests", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--capacity-requests", type=int, default=128)
    p.add_argument("--model", default=None)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="/tmp/tpserve_overload_server.log")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability/overload.json"))
    args = p.parse_args()

    with ServerProcess(server_flags(args), args.nproc, Path(args.log)) as server:
        grpc_target, http_url, pids = server.grpc, server.http, server.rank_pids()
        from tpserve.client import Client

        with Client(grpc_target) as client:
            vocab = client.model_info().vocab_size
        cap_work = workload(args.capacity_requests, args.seed, args.prompt_tokens, args.max_tokens, vocab)
        asyncio.run(run_load(grpc_target, cap_work[:16], float("inf"), args.max_num_seqs))  # warm-up
        results, elapsed = asyncio.run(run_load(grpc_target, cap_work, float("inf"), args.max_num_seqs))
        capacity = sum(not r["rejected"] for r in results) / elapsed
        rate = args.factor * capacity
        work = workload(int(rate * args.seconds), args.seed + 1, args.prompt_tokens, args.max_tokens, vocab)
        rss_before = {r: rss_mib(pid) for r, pid in pids.items()}
        with Sampler(grpc_target, pids) as sampler:
            results, elapsed = asyncio.run(offered(grpc_target, http_url, work, rate, args.seed))
        time.sleep(2.0)
        rss_after = {r: rss_mib(pid) for r, pid in pids.items()}
    failed = [r["failed"] for r in results if "failed" in r]
    refused = [r for r in results if r.get("rejected")]
    done = [r for r in results if not r.get("rejected") and "failed" not in r]
    refuse_ms = [r["reject_latency"] * 1000 for r in refused]
    ttft_ms = [r["ttft"] * 1000 for r in done]
    row = {"capacity_req_s": round(capacity, 2), "offered_req_s": round(len(work) / elapsed, 2) if elapsed else None,
           "offered": len(work), "admitted_completed": len(done), "refused": len(refused), "failed": len(failed),
           "refused_frac": round(len(refused) / len(work), 3), "refuse_p50_ms": round(pct(refuse_ms, 50), 2),
           "refuse_p99_ms": round(pct(refuse_ms, 99), 2), "completed_req_s": round(len(done) / elapsed, 2),
           "ttft_p50_ms": round(pct(ttft_ms, 50), 1), "ttft_p99_ms": round(pct(ttft_ms, 99), 1),
           "max_waiting": sampler.max_waiting, "queue_limit": args.max_queued_requests}
    for protocol in ("grpc", "http"):
        mine = [r["reject_latency"] * 1000 for r in refused if r["protocol"] == protocol]
        row[f"refuse_p99_{protocol}_ms"] = round(pct(mine, 99), 2)
    memory = [{"rank": r, "rss_before_mib": round(rss_before[r], 1), "rss_peak_mib": round(sampler.rss_peak[r], 1),
               "rss_after_mib": round(rss_after[r], 1)} for r in pids]
    print_table([row], list(row))
    print_table(memory, list(memory[0]))
    checks = {"refuse_p99_under_50ms": row["refuse_p99_ms"] < 50, "no_failures": not failed,
              "queue_bounded": sampler.max_waiting <= args.max_queued_requests, "some_refused": len(refused) > 0}
    print_table([{"check": k, "ok": v} for k, v in checks.items()], ["check", "ok"])
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "result": row, "memory": memory,
                          "checks": checks, "failures": failed[:20]})
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
