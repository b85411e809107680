"""Soak: thousands of mixed requests against one real server, then proof that nothing leaked.

    python benchmarks/soak.py [--requests 2000] [--concurrency 48] [--out FILE]

Starts the bundled model under torchrun (2 CPU ranks unless --nproc) with draft-model speculation
and a KV cache small enough that the scheduler preempts, and sends `--requests` requests over gRPC
and HTTP from `--concurrency` closed-loop clients: prompts sharing a few long prefixes (prefix
cache hits), greedy and sampled, stop strings, clients that cancel mid-stream, deadlines that
expire, and seeded sampled requests whose tokens were recorded in a calm run before the load.

It checks, and exits 1 if any check fails:
- at idle afterwards no KV block leaked: free + cached = total, none in use, nothing running;
- each rank's resident memory grew < 5 % from the end of warm-up (the first 20 % of requests,
  measured at idle) to the end (measured at idle);
- every rank is alive and readiness is SERVING;
- every seeded request gave the same tokens under load as in the calm run;
- no request failed other than by its own cancel or deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

from common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tpserve.profile.server import ServerProcess  # noqa: E402


def server_flags(args) -> list[str]:
    flags = ["--dtype", "float32", "--num-kv-blocks", str(args.num_kv_blocks), "--max-num-seqs",
             str(args.max_num_seqs), "--speculative-method", "draft", "--served-model-name", "soak"]
    return flags + (["--model", args.model] if args.model else [])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


PREFIXES = [
    "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the arguments and run the command.\"\"\"\n",
    "class Node:\n    def __init__(self, value, children=None):\n        self.value = value\n",
    "def read_config(path):\n    with open(path) as f:\n        data = f.read()\n    result = {}\n",
    "# Utilities for parsing dates and times.\nimport re\nfrom datetime import datetime, timedelta\n\n",
]
STOPS = ["\n\n", "return", ")", ":", "self"]


def make_workload(n: int, seed: int, num_seeded: int) -> list[dict]:
    rng = random.Random(seed)
    work = []
    for i in range(n):
        prefix = PREFIXES[rng.randrange(len(PREFIXES))] * rng.choice([1, 2, 4])
        item = {"i": i, "protocol": rng.choice(["grpc", "http"]), "prompt": prefix + f"    x{i} = ",
                "max_tokens": rng.choice([8, 16, 32, 64]), "temperature": rng.choice([0.0, 0.8]),
                "stop": [], "kind": "plain"}
        r = rng.random()
        if r < 0.15:
            item["kind"], item["cancel_after_s"] = "cancel", rng.uniform(0.0, 0.6)
        elif r < 0.25:
            item["kind"], item["deadline_s"] = "deadline", rng.uniform(0.05, 1.0)
        elif r < 0.40:
            item["stop"] = [rng.choice(STOPS)]
        elif r < 0.50:
            item["kind"], item["seeded"] = "seeded", rng.randrange(num_seeded)
        work.append(item)
    return work


def seeded_request(k: int) -> dict:
    return {"prompt": PREFIXES[k % len(PREFIXES)] + f"    seed_{k} = ", "max_tokens": 32, "temperature": 0.9,
            "seed": 1000 + k, "stop": []}


async def run_grpc(stub, item: dict) -> dict:
    import grpc

    from tpserve.client import build_request

    sampling = {"max_tokens": item["max_tokens"], "temperature": item["temperature"]}
    if item.get("seed") is not None:
        sampling["seed"] = item["seed"]
    if item["stop"]:
        sampling["stop"] = item["stop"]
    req = build_request(item["prompt"], True, **sampling)
    tokens = []
    call = stub.Generate(req, timeout=item.get("deadline_s", 300))
    try:
        async for resp in call:
            if resp.HasField("chunk"):
                tokens.extend(resp.chunk.token_ids)
                if item["kind"] == "cancel" and time.monotonic() - item["_t0"] >= item["cancel_after_s"]:
                    call.cancel()
                    return {"outcome": "cancelled", "tokens": tokens}
        return {"outcome": "finished", "tokens": tokens}
    except asyncio.CancelledError:
        return {"outcome": "cancelled", "tokens": tokens}
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and item["kind"] == "deadline":
            return {"outcome": "deadline", "tokens": tokens}
        if e.code() == grpc.StatusCode.CANCELLED and item["kind"] == "cancel":
            return {"outcome": "cancelled", "tokens": tokens}
        return {"outcome": f"error {e.code().name}: {e.details()}", "tokens": tokens}


async def run_http(client, item: dict) -> dict:
    import httpx

    body = {"model": "soak", "prompt": item["prompt"], "max_tokens": item["max_tokens"],
            "temperature": item["temperature"], "stream": True}
    if item.get("seed") is not None:
        body["seed"] = item["seed"]
    if item["stop"]:
        body["stop"] = item["stop"]
    text = []
    timeout = httpx.Timeout(item.get("deadline_s", 300))
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return {"outcome": f"error HTTP {r.status_code}: {(await r.aread())[:200]!r}", "text": ""}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"outcome": f"error event: {chunk['error']}", "text": "".join(text)}
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["text"])
                if item["kind"] == "cancel" and time.monotonic() - item["_t0"] >= item["cancel_after_s"]:
                    return {"outcome": "cancelled", "text": "".join(text)}  # closing the stream cancels it
        return {"outcome": "finished", "text": "".join(text)}
    except httpx.TimeoutException:
        if item["kind"] == "deadline":
            return {"outcome": "deadline", "text": "".join(text)}
        return {"outcome": "error: client timeout", "text": "".join(text)}


async def one(stub, client, item: dict) -> dict:
    item["_t0"] = time.monotonic()
    if item["protocol"] == "grpc":
        out = await run_grpc(stub, item)
    else:
        out = await run_http(client, item)
    out["seconds"] = time.monotonic() - item["_t0"]
    return out


async def server_info(stub):
    from tpserve.v1 import generation_pb2 as pb

    return await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)


async def wait_idle(stub, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        info = await server_info(stub)
        if info.num_running_requests == 0 and info.num_waiting_requests == 0 and info.kv_blocks_in_use == 0:
            return info
        if time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.2)


async def soak(args, grpc_target: str, http_url: str, pids: dict[int, int]) -> dict:
    import grpc
    import httpx

    from tpserve.v1 import generation_pb2_grpc as pb_grpc

    work = make_workload(args.requests, args.seed, args.seeded)
    seeded = [seeded_request(k) for k in range(args.seeded)]
    async with grpc.aio.insecure_channel(grpc_target) as channel, \
            httpx.AsyncClient(base_url=http_url, limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        stub = pb_grpc.GenerationStub(channel)
        calm = {}
        for k, req in enumerate(seeded):  # alone, one at a time: the reference
            out = await one(stub, client, {**req, "protocol": "grpc", "kind": "seeded"})
            calm[k] = out["tokens"]
        for item in work:
            if item["kind"] == "seeded":
                item.update(seeded[item["seeded"]])
        warmup = max(1, len(work) // 5)
        results: list[dict | None] = [None] * len(work)
        rss = {"start": {r: rss_mib(p) for r, p in pids.items()}}

        async def phase(items):
            queue = asyncio.Queue()
            for item in items:
                queue.put_nowait(item)

            async def worker():
                while not queue.empty():
                    item = queue.get_nowait()
                    results[item["i"]] = await one(stub, client, item)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        started = time.monotonic()
        await phase(work[:warmup])
        await wait_idle(stub)
        rss["after_warmup"] = {r: rss_mib(p) for r, p in pids.items()}
        await phase(work[warmup:])
        elapsed = time.monotonic() - started
        info = await wait_idle(stub)
        await asyncio.sleep(1.0)
        rss["end"] = {r: rss_mib(p) for r, p in pids.items()}
        metrics = (await client.get("/metrics")).text
        serving = (await client.get("/health")).status_code == 200
    preemptions = sum(float(m.group(1)) for m in re.finditer(r"^tpserve:num_preemptions_total\{[^}]*\} (\S+)$", metrics, re.M))
    outcomes: dict[str, int] = {}
    for r in results:
        key = r["outcome"] if not r["outcome"].startswith("error") else "error"
        outcomes[key] = outcomes.get(key, 0) + 1
    errors = [r["outcome"] for r in results if r["outcome"].startswith("error")]
    mismatched = []
    for item, r in zip(work, results):
        if item["kind"] == "seeded" and item["protocol"] == "grpc" and r["outcome"] == "finished":
            if r["tokens"] != calm[item["seeded"]]:
                mismatched.append(item["i"])
    seeded_checked = sum(1 for item, r in zip(work, results)
                         if item["kind"] == "seeded" and item["protocol"] == "grpc" and r["outcome"] == "finished")
    growth = {r: (rss["end"][r] - rss["after_warmup"][r]) / rss["after_warmup"][r] for r in pids}
    checks = {
        "no_leaked_blocks": info.kv_blocks_in_use == 0 and info.kv_blocks_free + info.kv_blocks_cached == info.kv_blocks_total
                            and info.num_running_requests == 0 and info.num_waiting_requests == 0,
        "rss_growth_under_5pct": all(g < 0.05 for g in growth.values()),
        "ranks_alive_and_serving": all(alive(p) for p in pids.values()) and serving,
        "seeded_equal_to_calm": not mismatched and seeded_checked > 0,
        "no_failed_requests": not errors,
        "preempted": preemptions > 0,
    }
    return {"requests": len(work), "seconds": round(elapsed, 1), "outcomes": outcomes, "errors": errors[:20],
            "kv_blocks": {"free": info.kv_blocks_free, "cached": info.kv_blocks_cached, "total": info.kv_blocks_total,
                          "in_use": info.kv_blocks_in_use},
            "preemptions": preemptions, "prefix_cache_hit_rate": round(info.prefix_cache_hit_rate, 3),
            "speculation_acceptance": round(info.speculation.acceptance_rate, 3) if info.HasField("speculation") else None,
            "rss_mib": rss, "rss_growth": {r: round(g, 4) for r, g in growth.items()},
            "seeded_checked": seeded_checked, "seeded_mismatched": mismatched, "checks": checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--seeded", type=int, default=8, help="distinct seeded requests checked against the calm run")
    p.add_argument("--model", default=None, help="default: the bundled model (its draft speculates)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--num-kv-blocks", type=int, default=64, help="small, so that the scheduler preempts")
    p.add_argument("--max-num-seqs", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="/tmp/tpserve_soak_server.log")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability/soak.json"))
    args = p.parse_args()

    with ServerProcess(server_flags(args), args.nproc, Path(args.log)) as server:
        result = asyncio.run(soak(args, server.grpc, server.http, server.rank_pids()))
    checks = result["checks"]
    print_table([{"check": k, "ok": v} for k, v in checks.items()], ["check", "ok"])
    print_table([{"requests": result["requests"], "seconds": result["seconds"], "preemptions": result["preemptions"],
                  "hit_rate": result["prefix_cache_hit_rate"], "kv_free+cached/total":
                  f"{result['kv_blocks']['free']}+{result['kv_blocks']['cached']}/{result['kv_blocks']['total']}",
                  **{f"rss_growth_rank{r}": g for r, g in result["rss_growth"].items()},
                  "seeded_checked": result["seeded_checked"]}],
                ["requests", "seconds", "preemptions", "hit_rate", "kv_free+cached/total",
                 *[f"rss_growth_rank{r}" for r in result["rss_growth"]], "seeded_checked"])
    print("outcomes:", result["outcomes"])
    write_json(args.out, {"machine": machine_info(), "args": vars(args), **result})
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
