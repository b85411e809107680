"""Checks of an operating point chosen by `python -m tpserve.profile`.

crosscheck: the server at the chosen flags, loaded in turn by tpserve.loadgen and by an independent
load generator (GuideLLM, `guidellm run`, concurrent streams over the OpenAI HTTP API) with the same
text prompts and output lengths at the same concurrency; their output throughput and p95 TTFT
should agree within 10%. On a machine with few cores the load generator's own CPU is taken from
the server (GuideLLM keeps about 0.8 of a core busy, tpserve.loadgen 0.1): `--server-cpus 0
--client-cpus 1` gives each side cores of its own. GuideLLM is not a tpserve dependency: install it into a venv of its own
(`python -m venv /tmp/gl && /tmp/gl/bin/pip install -c constraints-cpu.txt guidellm`) and pass
`--guidellm /tmp/gl/bin/guidellm`.

overload: Poisson arrivals at `--factor` times the chosen point's profiled request rate for
`--seconds`, against the server with admission control (the operating point's TTFT SLO) and then
with it off (`--slo-ttft 0`): requests admitted and refused, p95 TTFT of the admitted, and goodput
(requests per second meeting the SLO) as a fraction of the profiled maximum.

    python benchmarks/operating_point_check.py crosscheck --point out/profile/operating_point.json \\
        --guidellm /tmp/gl/bin/guidellm
    python benchmarks/operating_point_check.py overload --point out/profile/operating_point.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

from common import machine_info, print_table, write_json

from tpserve.loadgen import run_load, summarize
from tpserve.profile.server import ServerProcess, scrape
from tpserve.profile.sweep import SLO
from tpserve.profile.workload import LengthDist, synthetic


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def load_point(path: str) -> tuple[dict, dict]:
    """(operating point, the profile's report) - the report lies beside the point."""
    point = json.loads(Path(path).read_text())
    report = json.loads((Path(path).parent / "report.json").read_text())
    return point, report


def server_flags(point: dict, **override) -> list[str]:
    flags = {**point["flags"], **override}
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(k)
        elif v is not None and v is not False:
            out += [k, str(v)]
    return out


def profile_workload(point: dict, report: dict, n: int, seed: int):
    """(tokenizer, n requests of the profile's synthetic workload as (token ids, output length))."""
    from transformers import AutoTokenizer

    from tpserve.config import ModelConfig

    model = point["flags"]["--model"]
    tok = AutoTokenizer.from_pretrained(model)
    w = report["settings"]["workload"]
    return tok, synthetic(n, LengthDist.parse(w["input_len"], "input_len"),
                          LengthDist.parse(w["output_len"], "output_len"), tok, ModelConfig.from_dir(model).vocab_size,
                          seed)


def text_workload(point: dict, report: dict, n: int, seed: int) -> list[tuple[str, int]]:
    """The profile's workload as text prompts (both load generators send the same text)."""
    tok, work = profile_workload(point, report, n, seed)
    return [(tok.decode(ids), out) for ids, out in work]


def run_guidellm(exe: str, http: str, model: str, tokenizer: str, data: Path, streams: int, n: int, out: Path) -> dict:
    cmd = [exe, "run", "--backend", f"kind=openai_http,target={http},model={model},request_format=/v1/completions",
           "--profile", f"kind=concurrent,streams={streams}", "--constraint", f"kind=max_requests,count={n}",
           "--tokenizer", f"kind=hf_auto,model={tokenizer}", "--data", f"kind=json_file,path={data}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"guidellm failed ({res.returncode}): {res.stderr[-3000:]}\n{res.stdout[-2000:]}")
    return parse_guidellm(json.loads(out.read_text()))


def parse_guidellm(report: dict) -> dict:
    """Output tokens/s over the benchmark's duration and TTFT percentiles, from GuideLLM's JSON."""
    bench = report["benchmarks"][-1]
    m = bench["metrics"]
    ttft = m["time_to_first_token_ms"]["successful"]["percentiles"]
    requests = m["request_totals"]["successful"] if "request_totals" in m else None
    out_tokens = m["output_token_count"]["successful"]["total_sum"]
    duration = bench.get("duration") or (bench["end_time"] - bench["start_time"])
    return {"out_tok_per_s": out_tokens / duration, "ttft_p50_ms": ttft["p50"], "ttft_p95_ms": ttft["p95"],
            "requests": requests, "seconds": duration}


def crosscheck(args) -> None:
    point, report = load_point(args.point)
    batch = point["batch_size"]
    n = args.num_requests or max(16, 4 * batch)
    work = text_workload(point, report, n, args.seed)
    out = Path(args.output).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "crosscheck_data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "output_tokens_count": k}) + "\n" for p, k in work))
    rows, runs = [], {"tpserve.loadgen": [], "guidellm": []}
    # Both generators send the same prompts, run after run: without prefix caching every run
    # computes its prefills, as every profiled run did (each drew prompts of its own).
    flags = server_flags(point, **{"--slo-ttft": "0", "--no-prefix-caching": True})
    if args.server_cpus:  # the server on its cores, both load generators on the others
        os.sched_setaffinity(0, args.client_cpus)
    with ServerProcess(flags, point["tp"], out / "crosscheck_server.log", cpus=args.server_cpus) as srv:
        model = json.loads(__import__("httpx").get(srv.http + "/v1/models").text)["data"][0]["id"]
        asyncio.run(run_load(srv.http, work[:batch], float("inf"), batch))  # warm-up
        for r in range(args.repeats):
            order = ["tpserve.loadgen", "guidellm"] if r % 2 == 0 else ["guidellm", "tpserve.loadgen"]
            for who in order:
                who_usage = resource.RUSAGE_CHILDREN if who == "guidellm" else resource.RUSAGE_SELF
                cpu0, wall0 = cpu_seconds(who_usage), time.perf_counter()
                if who == "guidellm":
                    row = run_guidellm(args.guidellm, srv.http, model, point["flags"]["--model"], data, batch, n,
                                       out / f"guidellm_{r}.json")
                else:
                    results, elapsed = asyncio.run(run_load(srv.http, work, float("inf"), batch))
                    row = summarize("closed loop", results, elapsed, float("inf"), float("inf"))
                # The load generator's own CPU (cores busy on average): on a 2-core machine it is taken
                # from the server.
                row["client_cores"] = (cpu_seconds(who_usage) - cpu0) / (time.perf_counter() - wall0)
                runs[who].append({k: row[k] for k in ("out_tok_per_s", "ttft_p50_ms", "ttft_p95_ms", "client_cores")})
    for who, rs in runs.items():
        rows.append({"generator": who, "concurrency": batch, "requests": n,
                     **{k: statistics.median(r[k] for r in rs)
                        for k in ("out_tok_per_s", "ttft_p50_ms", "ttft_p95_ms", "client_cores")}})
    ratio = {k: statistics.median(g[k] / t[k] for g, t in zip(runs["guidellm"], runs["tpserve.loadgen"]))
             for k in ("out_tok_per_s", "ttft_p95_ms")}
    profiled = point["measured"]
    rows.append({"generator": "profile (chosen point)", "concurrency": batch, "requests": None,
                 "out_tok_per_s": profiled["out_tok_per_s"], "ttft_p50_ms": None, "ttft_p95_ms": profiled["ttft_p95_ms"],
                 "client_cores": None})
    print_table(rows, ["generator", "concurrency", "requests", "out_tok_per_s", "ttft_p50_ms", "ttft_p95_ms",
                       "client_cores"])
    print(f"\nguidellm / tpserve.loadgen (median of paired runs): output tok/s {ratio['out_tok_per_s']:.3f}, "
          f"p95 TTFT {ratio['ttft_p95_ms']:.3f}")
    write_json(args.output, {"rows": rows, "runs": runs, "guidellm_over_loadgen": ratio, "point": point,
                             "server_cpus": args.server_cpus, "client_cpus": args.client_cpus,
                             "machine": machine_info()})


def overload(args) -> None:
    point, report = load_point(args.point)
    if not point.get("slo_ttft_s"):
        raise SystemExit(f"{args.point} was profiled without --slo-ttft-p95: admission control has no SLO to hold")
    slo = SLO(**point["slo"])
    capacity = point["measured"]["req_per_s"]
    chosen = next(p for p in report["points"]
                  if p["candidate"] == point["candidate"] and p["batch_size"] == point["batch_size"])
    profiled_goodput = chosen["goodput_req_per_s"]
    rate = args.factor * capacity
    n = int(rate * args.seconds)
    _, work = profile_workload(point, report, n, args.seed)
    ttft_ms, tpot_ms = slo.goodput_limits_ms
    rows, raw = [], {}
    out = Path(args.output).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    for label, slo_flag in (("admission on", str(point["slo_ttft_s"])), ("admission off", "0")):
        with ServerProcess(server_flags(point, **{"--slo-ttft": slo_flag}), point["tp"],
                           out / f"overload_{label.split()[1]}.log") as srv:
            asyncio.run(run_load(srv.http, work[: point["batch_size"]], float("inf"), point["batch_size"]))
            before = scrape(srv.http)
            t0 = time.perf_counter()
            target = srv.grpc if args.protocol == "grpc" else srv.http
            results, elapsed = asyncio.run(run_load(target, work, rate, 0, args.seed))
            after = scrape(srv.http)
        row = summarize(label, results, elapsed, ttft_ms, tpot_ms)
        admitted = [r for r in results if not r["rejected"]]
        # goodput_req_per_s (summarize): requests meeting the SLO per second, from the first arrival
        # until the last response (a queue left to drain after the offered minute counts against it).
        row.update(offered_req_per_s=n / args.seconds, admitted=len(admitted), wall_seconds=time.perf_counter() - t0,
                   good=sum(r["ttft"] * 1000 <= ttft_ms and r["tpot"] * 1000 <= tpot_ms for r in admitted))
        row["goodput_vs_profiled"] = row["goodput_req_per_s"] / profiled_goodput if profiled_goodput else float("nan")
        row["server_rejected"] = sum(v - before.get(k, 0.0) for k, v in after.items()
                                     if k.startswith("tpserve:request_rejected_total"))
        row["slo_ttft_p95_ok"] = row["ttft_p95_ms"] <= ttft_ms
        rows.append(row)
        raw[label] = [{k: r[k] for k in ("rejected", "ttft", "tpot", "tokens") if k in r} for r in results]
    print(f"offered {rate:.2f} req/s = {args.factor:g} x the profiled {capacity:.2f} req/s, for {args.seconds:g} s; "
          f"SLO {slo.describe()}; profiled goodput {profiled_goodput:.2f} req/s")
    print_table(rows, ["load", "offered_req_per_s", "admitted", "rejected", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms",
                       "tpot_p95_ms", "reject_latency_p95_ms", "goodput_req_per_s", "goodput_vs_profiled",
                       "slo_ttft_p95_ok"])
    write_json(args.output, {"rows": rows, "rate": rate, "capacity_req_per_s": capacity, "factor": args.factor,
                             "seconds": args.seconds, "profiled_goodput_req_per_s": profiled_goodput, "slo": point["slo"],
                             "point": point, "requests": raw, "machine": machine_info()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crosscheck")
    c.add_argument("--point", required=True)
    c.add_argument("--guidellm", required=True, help="path of the guidellm executable")
    c.add_argument("--num-requests", type=int, default=None, help="default: max(16, 4 x batch)")
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--server-cpus", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="pin the server to these cores (e.g. 0) and the load generators to --client-cpus")
    c.add_argument("--client-cpus", type=lambda t: [int(x) for x in t.split(",")], default=None)
    c.add_argument("--output", default="out/crosscheck.json")
    o = sub.add_parser("overload")
    o.add_argument("--point", required=True)
    o.add_argument("--factor", type=float, default=3.0)
    o.add_argument("--seconds", type=float, default=60.0)
    o.add_argument("--seed", type=int, default=11)
    o.add_argument("--protocol", choices=["grpc", "http"], default="grpc",
                   help="the offered load's protocol (gRPC costs the client less CPU, which this machine shares)")
    o.add_argument("--output", default="out/overload.json")
    args = p.parse_args()
    crosscheck(args) if args.cmd == "crosscheck" else overload(args)


if __name__ == "__main__":
    main()
