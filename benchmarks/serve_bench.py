"""Serving benchmark against tpserve's gRPC and OpenAI HTTP front doors.

Poisson arrivals at each given rate (or a fixed number of concurrent clients), seeded prompts and
output lengths, streaming requests. Reports TTFT, TPOT, ITL and end-to-end latency (mean, median,
p95, p99), request and output-token throughput, and goodput under the given SLOs. With
--compare-offline it also runs the same workload through the offline engine in this process and
reports the server's throughput with --concurrency streaming clients as a fraction of it.

Given several targets (`--address NAME=TARGET ...`, or the ones this benchmark starts), each load
runs on each of them in turn, `--repeats` times with the order rotated, so that two servers (two
revisions, two configurations, two protocols) are compared through the same bursts of machine
noise; the first table gives each target's medians, the second, for every pair (A, B), the median
over repeats of B's figure / A's in the same repeat (output throughput, and mean TTFT / TPOT,
where below 1 is faster).

Targets are gRPC addresses (HOST:PORT) or OpenAI HTTP base URLs (http://HOST:PORT), loaded by
`tpserve.loadgen` (an HTTP request is a streaming `/v1/completions` call with usage). Started by
the benchmark itself, `--protocol grpc http` measures both doors of one server, and `--metrics
both` starts a second server with `--no-metrics` (only one runs a load at a time).

    python benchmarks/serve_bench.py --rates 2 8 inf --concurrency 64 --compare-offline
    python benchmarks/serve_bench.py --rates --protocol grpc http --metrics both --repeats 5
    python benchmarks/serve_bench.py --address host:50051 --rates 4     # an already running server
    python benchmarks/serve_bench.py --address http://host:8000 --rates 4
    python benchmarks/serve_bench.py --address old=127.0.0.1:50051 new=127.0.0.1:50052 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info, print_table, seeded_workload, write_json

from tpserve.loadgen import median_row, run_load, summarize, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def paired_ratios(runs: dict, loads: list[str], names: list[str]) -> list[dict]:
    """For every load and pair of targets, the median over repeats of B's figure / A's in that repeat."""
    out = []
    for label in loads:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                row = {"load": label, "A": a, "B": b}
                for key, metric in (("tok_per_s", "out_tok_per_s"), ("ttft_mean", "ttft_mean_ms"),
                                    ("tpot_mean", "tpot_mean_ms")):
                    row[key] = statistics.median(rb[metric] / ra[metric]
                                                 for ra, rb in zip(runs[(label, a)], runs[(label, b)]))
                out.append(row)
    return out


def start_server(args, metrics: bool = True):
    """-> (process, {protocol: target}) for a 1-process server on free ports."""
    from tpserve.profile.server import free_port

    port, http_port = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "launch" / "serve.py"), "--port", str(port), "--http-port", str(http_port),
           "--host", "127.0.0.1", "--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype]
    if args.model:
        cmd += ["--model", args.model]
    if not metrics:
        cmd.append("--no-metrics")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, {"grpc": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{http_port}"}


def offline_throughput(args, work):
    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.bundled import DEFAULT_MODEL_DIR
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.server.offline import generate

    _, engine = build_runtime(EngineArgs(model=args.model or str(DEFAULT_MODEL_DIR), dtype=args.dtype,
                                         max_num_seqs=args.max_num_seqs), TPGroup())
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    res = generate(engine, [p for p, _ in work], params)
    return sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", nargs="+", default=None,
                   help="running servers, as TARGET or NAME=TARGET, TARGET being a gRPC HOST:PORT or an http:// URL; "
                        "default: start one (1 process)")
    p.add_argument("--protocol", nargs="+", choices=["grpc", "http"], default=["grpc"],
                   help="front doors to load on the server this benchmark starts (each is a target)")
    p.add_argument("--metrics", choices=["on", "off", "both"], default="on",
                   help="start the server with metrics on, off (--no-metrics) or one of each")
    p.add_argument("--repeats", type=int, default=1, help="runs of each load on each server (medians reported)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--rates", type=float, nargs="*", default=[2.0, 8.0], help="Poisson request rates (req/s); none: skip")
    p.add_argument("--concurrency", type=int, default=64, help="max-concurrency mode (0: off)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--compare-offline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/serve_bench.json")
    args = p.parse_args()

    from tpserve.config import ModelConfig
    from tpserve.bundled import DEFAULT_MODEL_DIR

    cfg = ModelConfig.from_dir(args.model or DEFAULT_MODEL_DIR)
    work = seeded_workload(args.num_requests, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
    procs = []
    servers = dict(a.split("=", 1) if "=" in a else (a, a) for a in args.address or [])
    if not servers:
        for metrics in {"on": [True], "off": [False], "both": [True, False]}[args.metrics]:
            proc, targets = start_server(args, metrics)
            procs.append(proc)
            suffix = "" if args.metrics == "on" else f" metrics-{'on' if metrics else 'off'}"
            servers.update({f"{protocol}{suffix}": targets[protocol] for protocol in args.protocol})
    loads = [(f"poisson {rate:g}/s", rate, 0) for rate in args.rates]
    if args.concurrency:
        loads.append((f"concurrency {args.concurrency}", float("inf"), args.concurrency))
    names = list(servers)
    runs = {(load, name): [] for load, _, _ in loads for name in names}
    try:
        for address in servers.values():
            wait_ready(address)
            asyncio.run(run_load(address, work[:4], float("inf"), 4, args.seed))  # warm-up
        for label, rate, concurrency in loads:
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    results, elapsed = asyncio.run(run_load(servers[name], work, rate, concurrency, args.seed))
                    runs[(label, name)].append(summarize(label, results, elapsed, args.slo_ttft_ms, args.slo_tpot_ms))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    rows = [{"server": name, **median_row(runs[(label, name)])} for label, _, _ in loads for name in names]
    columns = ["load", "requests", "req_per_s", "out_tok_per_s", "ttft_mean_ms", "ttft_p50_ms", "ttft_p95_ms",
               "ttft_p99_ms", "tpot_mean_ms", "tpot_p95_ms", "itl_p50_ms", "itl_p95_ms", "e2e_p50_ms", "e2e_p95_ms",
               "goodput_req_per_s"]
    if len(names) > 1:
        columns = ["server", *columns]
    print_table(rows, columns)
    pairs = paired_ratios(runs, [label for label, _, _ in loads], names)
    if pairs:
        print("\npaired ratios, B / A (median over repeats of runs side by side; ttft / tpot below 1: B faster)")
        print_table(pairs, list(pairs[0]))
    payload = {"rows": rows, "pairs": pairs, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
               "num_requests": args.num_requests, "repeats": args.repeats, "servers": servers,
               "runs": {f"{name} {load}": r for (load, name), r in runs.items()}, "machine": machine_info()}
    if args.compare_offline and args.concurrency:
        offline = offline_throughput(args, work)
        frac = rows[-1]["out_tok_per_s"] / offline
        print(f"\nserver with {args.concurrency} streaming clients: {rows[-1]['out_tok_per_s']:.1f} tok/s; "
              f"offline engine: {offline:.1f} tok/s; ratio {frac:.2f}")
        payload.update(offline_tok_per_s=offline, server_vs_offline=frac)
    write_json(args.output, payload)


if __name__ == "__main__":
    main()
