"""Client-side load against a tpserve server, over gRPC (tpserve.v1) or OpenAI HTTP.

A target is a gRPC `HOST:PORT` or an `http://HOST:PORT` base URL; an HTTP request is a streaming
`/v1/completions` call with `stream_options.include_usage`, so both protocols carry the same work.
Every request is greedy with `ignore_eos`, so its output length is the one asked for. Arrivals are
Poisson at a rate, all at once (`rate=inf`), or closed-loop with at most `concurrency` in flight.
A request the server refuses for load (gRPC RESOURCE_EXHAUSTED, HTTP 429) is recorded as rejected
with the time the refusal took; any other failure raises. Shared by `benchmarks/serve_bench.py`
and `python -m tpserve.profile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time

Prompt = str | list[int]


def pct(values, q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN when there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def timing(t0: float, stamps: list[float], end: float, n: int) -> dict:
    """One request's latencies (seconds) from its start, the arrival time of each output and its end."""
    ttft = stamps[0] - t0
    return {"ttft": ttft, "e2e": end - t0, "tokens": n, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tpot": (end - t0 - ttft) / (n - 1) if n > 1 else 0.0, "rejected": False}


def rejected(t0: float, message: str) -> dict:
    return {"rejected": True, "reject_latency": time.perf_counter() - t0, "message": message}


async def grpc_request(stub, prompt: Prompt, max_tokens: int, model: str = "") -> dict:
    import grpc

    from tpserve.client import build_request

    req = build_request(prompt, True, model=model, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    stamps, n, served = [], 0, ""
    try:
        async for resp in stub.Generate(req):
            if resp.HasField("chunk") and resp.chunk.token_ids:
                stamps.append(time.perf_counter())
                n += len(resp.chunk.token_ids)
            elif resp.HasField("complete"):
                served = resp.complete.model
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return rejected(t0, e.details())
        raise
    return {**timing(t0, stamps, time.perf_counter(), n), "model": served}


async def http_request(client, model: str, prompt: Prompt, max_tokens: int) -> dict:
    """A streaming OpenAI completion; each event is one engine output, usage gives the tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, n = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as res:
        if res.status_code == 429:
            return rejected(t0, json.loads(await res.aread())["error"]["message"])
        res.raise_for_status()
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the server ended the stream with an error: {chunk['error']}")
            if chunk["choices"]:
                stamps.append(time.perf_counter())
            elif chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return timing(t0, stamps, time.perf_counter(), n)


def wait_ready(target: str, timeout: float = 300, check=None) -> None:
    """Poll gRPC health (HOST:PORT) or GET /health (http:// URL) until the server serves;
    check(), if given, runs before every poll (and may raise, say when the server died)."""
    deadline = time.monotonic() + timeout
    if target.startswith("http://"):
        import httpx

        while time.monotonic() < deadline:
            if check is not None:
                check()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{target}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server at {target} not ready")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target.removeprefix("grpc://")))
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service="tpserve.v1.Generation"), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {target} not ready")


@contextlib.asynccontextmanager
async def connect(target: str, concurrency: int = 0):
    """-> an async function (prompt, max_tokens, model="") -> one request's record, for a gRPC
    HOST:PORT or an http:// URL (model: a served name or "auto"; empty: the target)."""
    if target.startswith("http://"):
        import httpx

        # Closed loop: a connection per client; open loop: no client-side limit, or the pool would
        # hold back the arrivals it is meant to offer.
        limits = httpx.Limits(max_connections=concurrency * 2 if concurrency else None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=target, limits=limits, timeout=600) as client:
            target_name = (await client.get("/v1/models")).json()["data"][0]["id"]
            yield lambda prompt, n, model="": http_request(client, model or target_name, prompt, n)
        return
    import grpc

    from tpserve.v1 import generation_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target.removeprefix("grpc://")) as channel:
        stub = pb_grpc.GenerationStub(channel)
        yield lambda prompt, n, model="": grpc_request(stub, prompt, n, model)


async def run_load(target: str, work: list[tuple], rate: float, concurrency: int,
                   seed: int = 0) -> tuple[list[dict], float]:
    """Send every (prompt, output length[, model]) of `work`; -> (one record per request, seconds
    taken)."""
    rng = random.Random(seed)
    async with connect(target, concurrency) as one_request:
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def limited(prompt, n, model=""):
            if sem is None:
                return await one_request(prompt, n, model)
            async with sem:
                return await one_request(prompt, n, model)

        tasks = []
        t0 = time.perf_counter()
        for item in work:
            tasks.append(asyncio.create_task(limited(*item)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(label: str, results: list[dict], elapsed: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """Throughput, latency percentiles (ms) and goodput (requests/s meeting both SLOs) of one run;
    rejected requests count in `rejected` and nowhere else."""
    done = [r for r in results if not r["rejected"]]
    row = {"load": label, "requests": len(done), "rejected": len(results) - len(done), "seconds": elapsed,
           "req_per_s": len(done) / elapsed, "out_tok_per_s": sum(r["tokens"] for r in done) / elapsed}
    for key in ("ttft", "tpot", "e2e"):
        vals = [r[key] * 1000 for r in done]
        row[f"{key}_mean_ms"] = statistics.mean(vals) if vals else float("nan")
        for q in (50, 95, 99):
            row[f"{key}_p{q}_ms"] = pct(vals, q)
    itl = [x * 1000 for r in done for x in r["itl"]]
    row["itl_mean_ms"] = statistics.mean(itl) if itl else float("nan")
    for q in (50, 95, 99):
        row[f"itl_p{q}_ms"] = pct(itl, q)
    good = [r for r in done if r["ttft"] * 1000 <= slo_ttft_ms and r["tpot"] * 1000 <= slo_tpot_ms]
    row["goodput_req_per_s"] = len(good) / elapsed
    refusals = [r["reject_latency"] * 1000 for r in results if r["rejected"]]
    row["reject_latency_p95_ms"] = pct(refusals, 95)
    return row


def median_row(rows: list[dict]) -> dict:
    """Each numeric field's median over repeated runs of one load."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rows)
    return out
