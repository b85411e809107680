"""Routing easy requests to the small model: quality against the fraction routed, per policy, and
what it saves in serving.

    python benchmarks/routing.py quality   # per-request quality under each model, each policy's score,
                                           # quality vs fraction, PGR at 25/50/75 %, APGR
    python benchmarks/routing.py audit     # the online audit's estimate against the offline truth
    python benchmarks/routing.py drift     # calibrated on stdlib, serving other projects' code: the
                                           # fraction a frozen threshold gives vs the online tracker
    python benchmarks/routing.py serve     # output tokens/s at 64 streams, 0/25/50/75 % small + the
                                           # best policy at the fraction that keeps PGR >= 0.9
    python benchmarks/routing.py placement # the small model on rank 0 vs sharded over the group
    python benchmarks/routing.py all

Requests are cut from the bundled corpus's held-out files (standard-library modules the bundled
models never trained on) at a line boundary: the prompt is up to `--max-prompt-tokens` tokens
before the cut, the truth is what follows. A request's quality under a model is the
log-likelihood of its true continuation (`--continuation-tokens` tokens), in bits per byte
(lower is better, teacher-forced by tpserve, which matches transformers to 1e-6), and whether
the model's greedy next line equals the true one. Scores come from the engine exactly as a server
computes them (`tpserve.route.calibrate.score_prompts`). For a fraction f sent to the small model,
a policy sends the f of requests with the highest scores; PGR(f) = (Q(f) - Q_small) / (Q_target -
Q_small) (RouteLLM's performance gap recovered, with Q the mean quality), APGR its average over f
in [0, 1]. The oracle routes by the true per-request gap; random's expected PGR is 1 - f (APGR
0.5). Confidence intervals are a bootstrap over requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "routing"
FRACTIONS = [i / 20 for i in range(21)]
POLICIES = ("random", "length", "length-long", "confidence", "cascade", "gap")
LN2 = math.log(2)


# --- requests --------------------------------------------------------------------------------
def other_projects_code(max_files: int = 400) -> dict[str, str]:
    """Python sources of installed third-party packages (not the standard library the bundled
    models know): the traffic a calibration made on stdlib code has never seen."""
    import site

    root = Path(site.getsitepackages()[0])
    files = {}
    for pkg in ("transformers", "numpy", "httpx", "fastapi", "pydantic", "grpc", "prometheus_client", "uvicorn"):
        for path in sorted((root / pkg).rglob("*.py"))[:max_files // 8]:
            try:
                files[str(path.relative_to(root))] = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return files


def cut_requests(tokenizer, n: int, seed: int, max_prompt_tokens: int, continuation_tokens: int,
                 sources: dict[str, str] | None = None, prompt_chars: tuple[int, int] = (400, 4000),
                 min_prompt_tokens: int = 48) -> list[dict]:
    """Seeded cuts of held-out files (or of `sources`) at line boundaries whose next line is not blank."""
    from tpserve.bundled.corpus import load_corpus

    held = sources if sources is not None else load_corpus()[1]
    files = sorted(held)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        lines = held[rng.choice(files)].splitlines(keepends=True)
        if len(lines) < 24:
            continue
        i = rng.randrange(8, len(lines) - 4)
        next_line = lines[i].rstrip("\n")
        if not next_line.strip():
            continue
        prompt_ids = tokenizer.encode("".join(lines[:i])[-rng.randint(*prompt_chars):], add_special_tokens=False)
        prompt_ids = prompt_ids[-rng.randint(min_prompt_tokens, max_prompt_tokens):]
        cont = tokenizer.encode("".join(lines[i:i + 40]), add_special_tokens=False)[:continuation_tokens]
        out.append({"prompt": prompt_ids, "continuation": cont, "next_line": next_line,
                    "continuation_bytes": len(tokenizer.decode(cont).encode())})
    return out


def load_engine(args):
    import torch

    from tpserve.distributed import TPGroup
    from tpserve.engine.setup import EngineArgs, build_runtime

    torch.set_num_threads(args.threads)
    _, engine = build_runtime(EngineArgs(model=args.model, small_model=args.small_model, dtype="float32",
                                         num_kv_blocks=4096, max_num_seqs=64),
                              TPGroup(device=torch.device("cpu")))
    return engine


def continuation_bits(engine, reqs: list[dict], model: str) -> list[float]:
    """Teacher-forced bits of each request's continuation under `model`."""
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.server.offline import generate

    ids = [r["prompt"] + r["continuation"] for r in reqs]
    res = generate(engine, ids, SamplingParams(max_tokens=0, prompt_logprobs=0), model=model)
    out = []
    for r, done in zip(reqs, res):
        n = len(r["prompt"])
        out.append(-sum(lp.logprob for lp in done.prompt_logprobs[n:]) / LN2)
    return out


def greedy_lines(engine, prompts: list[list[int]], model: str, max_tokens: int = 48) -> list[str]:
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.server.offline import generate

    res = generate(engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), model=model)
    return [r.text for r in res], [r.token_ids for r in res]


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def measure_requests(engine, reqs: list[dict], cascade_tokens: int) -> None:
    """Per-request quality under each model, and under the cascade's hand-over (the small model's
    first tokens, then the target's greedy continuation of them)."""
    from tpserve.route.router import SMALL, TARGET

    tok = engine.tokenizer
    for model, key in ((TARGET, "target"), (SMALL, "small")):
        t0 = time.perf_counter()
        for r, bits in zip(reqs, continuation_bits(engine, reqs, model)):
            r[f"{key}_bpb"] = bits / r["continuation_bytes"]
        texts, ids = greedy_lines(engine, [r["prompt"] for r in reqs], model)
        for r, text, out in zip(reqs, texts, ids):
            r[f"{key}_em"] = float(first_line(text) == r["next_line"])
            if model == SMALL:
                r["small_first"] = out[:cascade_tokens]
        print(f"  {key}: scored and generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    texts, _ = greedy_lines(engine, [r["prompt"] + r["small_first"] for r in reqs], TARGET)
    for r, text in zip(reqs, texts):
        r["cascade_em"] = float(first_line(tok.decode(r["small_first"]) + text) == r["next_line"])


def policy_scores(engine, reqs: list[dict], args) -> dict[str, list[float]]:
    from tpserve.route.calibrate import score_prompts
    from tpserve.route.router import RouteConfig

    scores = {}
    for policy in args.policies:  # length-long: --route-policy length --route-length-small long
        config = RouteConfig(policy=policy.removesuffix("-long"), aggregate_quantile=args.route_quantile,
                             tail_tokens=args.tail_tokens, cascade_tokens=args.cascade_tokens, seed=args.seed,
                             length_small="long" if policy.endswith("-long") else "short")
        scores[policy] = [-math.inf if s is None else s
                          for s in score_prompts(engine, [r["prompt"] for r in reqs], config)]
    scores["oracle"] = [r["target_bpb"] - r["small_bpb"] for r in reqs]  # high: the small model loses little
    return scores


# --- curves ----------------------------------------------------------------------------------
def quality(reqs: list[dict], metric: str, policy: str, small_mask: list[bool]) -> float:
    """Mean quality (-bits per byte, or exact match) with `small_mask` routed to the small model."""
    vals = []
    for r, small in zip(reqs, small_mask):
        if metric == "bpb":
            vals.append(-(r["small_bpb"] if small else r["target_bpb"]))
        else:
            target_em = r["cascade_em"] if policy == "cascade" else r["target_em"]
            vals.append(r["small_em"] if small else target_em)
    return statistics.fmean(vals)


def curve(reqs: list[dict], scores: list[float], metric: str, policy: str) -> list[dict]:
    order = sorted(range(len(reqs)), key=lambda i: (-scores[i], i))
    lo = quality(reqs, metric, policy, [True] * len(reqs))
    hi = quality(reqs, metric, policy, [False] * len(reqs))
    rows = []
    for f in FRACTIONS:
        k = round(f * len(reqs))
        mask = [False] * len(reqs)
        for i in order[:k]:
            mask[i] = True
        q = quality(reqs, metric, policy, mask)
        rows.append({"fraction_small": f, "quality": q, "pgr": (q - lo) / (hi - lo) if hi != lo else float("nan")})
    return rows


def apgr(rows: list[dict]) -> float:
    """Trapezoidal average of PGR over the fraction grid [0, 1]."""
    ys = [r["pgr"] for r in rows]
    return sum((a + b) / 2 for a, b in zip(ys, ys[1:])) / (len(ys) - 1)


def pgr_at(rows: list[dict], f: float) -> float:
    return next(r["pgr"] for r in rows if abs(r["fraction_small"] - f) < 1e-9)


def bootstrap_apgr(reqs, scores, metric, policy, n=200, seed=0) -> tuple[float, float]:
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        idx = [rng.randrange(len(reqs)) for _ in reqs]
        sub = [reqs[i] for i in idx]
        if quality(sub, metric, policy, [True] * len(sub)) == quality(sub, metric, policy, [False] * len(sub)):
            continue
        vals.append(apgr(curve(sub, [scores[i] for i in idx], metric, policy)))
    vals.sort()
    if not vals:
        return float("nan"), float("nan")
    return vals[int(0.025 * len(vals))], vals[max(0, int(0.975 * len(vals)) - 1)]


def max_fraction_at(rows: list[dict], min_pgr: float) -> float:
    """The largest fraction routed to the small model whose PGR is still >= min_pgr."""
    ok = [r["fraction_small"] for r in rows if r["pgr"] >= min_pgr]
    return max(ok) if ok else 0.0


def summarize_quality(reqs, scores) -> dict:
    out = {"metrics": {}}
    for metric in ("bpb", "em"):
        table = {}
        for policy, s in scores.items():
            rows = curve(reqs, s, metric, policy)
            lo95, hi95 = bootstrap_apgr(reqs, s, metric, policy) if policy != "oracle" else (None, None)
            table[policy] = {"curve": rows, "apgr": apgr(rows), "apgr_ci95": [lo95, hi95],
                             "pgr25": pgr_at(rows, 0.25), "pgr50": pgr_at(rows, 0.5), "pgr75": pgr_at(rows, 0.75),
                             "max_fraction_pgr90": max_fraction_at(rows, 0.9)}
        out["metrics"][metric] = table
    out["all_target"] = {"bpb": statistics.fmean(r["target_bpb"] for r in reqs),
                         "em": statistics.fmean(r["target_em"] for r in reqs)}
    out["all_small"] = {"bpb": statistics.fmean(r["small_bpb"] for r in reqs),
                        "em": statistics.fmean(r["small_em"] for r in reqs)}
    return out


def print_quality(summary: dict) -> None:
    print(f"\nall target: {summary['all_target']['bpb']:.4f} bits/byte, next-line EM {summary['all_target']['em']:.3f};"
          f"  all small: {summary['all_small']['bpb']:.4f} bits/byte, EM {summary['all_small']['em']:.3f}")
    for metric, label in (("bpb", "bits per byte of the true continuation"), ("em", "greedy next-line exact match")):
        print(f"\nPGR and APGR, {label}:")
        rows = []
        for policy, t in summary["metrics"][metric].items():
            ci = t["apgr_ci95"]
            rows.append({"policy": policy, "PGR@25%": t["pgr25"], "PGR@50%": t["pgr50"], "PGR@75%": t["pgr75"],
                         "APGR": t["apgr"], "APGR 95% CI": "" if ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}",
                         "max small @PGR>=0.9": t["max_fraction_pgr90"]})
        rows.append({"policy": "random (expected)", "PGR@25%": 0.75, "PGR@50%": 0.5, "PGR@75%": 0.25, "APGR": 0.5})
        print_table(rows, ["policy", "PGR@25%", "PGR@50%", "PGR@75%", "APGR", "APGR 95% CI", "max small @PGR>=0.9"])
    print("\nquality (-bits per byte) against the fraction sent to the small model:")
    bpb = summary["metrics"]["bpb"]
    rows = [{"small": f"{int(f * 100)}%", **{p: -t["curve"][i]["quality"] for p, t in bpb.items()}}
            for i, f in enumerate(FRACTIONS) if i % 2 == 0]
    print_table(rows, ["small", *bpb])


def run_quality(args) -> dict:
    engine = load_engine(args)
    reqs = cut_requests(engine.tokenizer, args.num_prompts, args.seed, args.max_prompt_tokens,
                        args.continuation_tokens, prompt_chars=args.prompt_chars, min_prompt_tokens=args.min_prompt_tokens)
    t0 = time.perf_counter()
    measure_requests(engine, reqs, args.cascade_tokens)
    scores = policy_scores(engine, reqs, args)
    print(f"measured {len(reqs)} requests in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = summarize_quality(reqs, scores)
    print_quality(summary)
    payload = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "func"},
               "summary": summary, "requests": [{**r, "scores": {p: s[i] for p, s in scores.items()}}
                                               for i, r in enumerate(reqs)]}
    write_json(OUT / f"quality{args.tag}.json", payload)
    return payload


# --- the audit against the offline truth ---------------------------------------------------------
def run_audit(args) -> dict:
    """Serve the quality set's prompts as `auto` requests with the best policy at a few fractions
    and every small-served request audited; compare the audit's quality gap with the truth on the
    same requests' true continuations."""
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.route.audit import AuditTotals
    from tpserve.route.router import AUTO, SMALL, RouteConfig, Router
    from tpserve.server.offline import generate

    data = json.loads((OUT / "quality.json").read_text())
    reqs = data["requests"]
    policy = args.audit_policy or best_policy(data["summary"])
    engine = load_engine(args)
    rows = []
    for fraction in args.audit_fractions:
        config = RouteConfig(policy=policy, small_fraction=fraction, aggregate_quantile=args.route_quantile,
                             tail_tokens=args.tail_tokens, cascade_tokens=args.cascade_tokens,
                             audit_rate=args.audit_rate, seed=args.seed)
        # The threshold this fraction gives on the set itself, so the routed share is the asked one.
        from tpserve.route.router import ScoreTracker

        threshold = ScoreTracker(len(reqs), [r["scores"][policy] for r in reqs]).threshold(fraction)
        engine.small.router = Router(RouteConfig(**{**config.__dict__, "threshold": threshold}))
        engine.small.audit_totals, engine.small.recent_audits = AuditTotals(), type(engine.small.recent_audits)(maxlen=len(reqs))
        res = generate(engine, [r["prompt"] for r in reqs],
                       SamplingParams(max_tokens=args.audit_output_tokens, temperature=0.0), model=AUTO)
        while engine.has_work():
            engine.step()
        small = [r for r, done in zip(reqs, res) if done.model == SMALL]
        s_bits = sum(r["small_bpb"] * r["continuation_bytes"] for r in small)
        t_bits = sum(r["target_bpb"] * r["continuation_bytes"] for r in small)
        est = engine.small.audit_totals.summary()
        rows.append({"policy": policy, "fraction_small": len(small) / len(reqs), "audit_rate": args.audit_rate,
                     "audits": est["num_audits"], "audit_gap": est["quality_gap"],
                     "truth_gap": (s_bits - t_bits) / t_bits if t_bits else float("nan"),
                     "audit_small_bpb": est["small_bits_per_byte"], "audit_target_bpb": est["target_bits_per_byte"],
                     "truth_small_bpb": s_bits / max(1, sum(r["continuation_bytes"] for r in small)),
                     "truth_target_bpb": t_bits / max(1, sum(r["continuation_bytes"] for r in small)),
                     "output_greedy_agreement": est["output_greedy_agreement"]})
        rows[-1]["difference_points"] = 100 * (rows[-1]["audit_gap"] - rows[-1]["truth_gap"])
    print("\nthe audit's live estimate of the relative quality gap on small-served requests, against the truth:")
    print_table(rows, ["policy", "fraction_small", "audits", "audit_gap", "truth_gap", "difference_points",
                       "audit_small_bpb", "truth_small_bpb", "audit_target_bpb", "truth_target_bpb",
                       "output_greedy_agreement"])
    payload = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}
    write_json(OUT / "audit.json", payload)
    return payload


def best_policy(summary: dict) -> str:
    table = summary["metrics"]["bpb"]
    return max((p for p in table if p not in ("oracle", "random", "length-long")), key=lambda p: table[p]["apgr"])


# --- serving cost ------------------------------------------------------------------------------
def serve_work(reqs: list[dict], n: int, output_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [reqs[rng.randrange(len(reqs))]["prompt"] for _ in range(n)]


def mixed(prompts: list[list[int]], fraction: float, small_name: str, target_name: str, output_tokens: int,
          seed: int) -> list[tuple]:
    k = round(fraction * len(prompts))
    small = set(random.Random(seed).sample(range(len(prompts)), k))
    return [(p, output_tokens, small_name if i in small else target_name) for i, p in enumerate(prompts)]


def run_serve(args) -> dict:
    from tpserve.loadgen import run_load, summarize
    from tpserve.profile.server import ServerProcess

    data = json.loads((OUT / "quality.json").read_text())
    reqs, summary = data["requests"], data["summary"]
    policy = args.serve_policy or best_policy(summary)
    f90 = args.auto_fraction if args.auto_fraction is not None else summary["metrics"]["bpb"][policy]["max_fraction_pgr90"]
    cal_path = OUT / "calibration.json"
    write_calibration(args, cal_path)
    flags = ["--model", args.model, "--small-model", args.small_model, "--dtype", "float32",
             "--served-model-name", "target", "--small-model-name", "small", "--max-num-seqs", "64",
             "--num-kv-blocks", "4096", "--route-policy", policy, "--route-small-fraction", str(f90),
             "--route-calibration", str(cal_path), "--route-quantile", str(args.route_quantile),
             "--route-tail-tokens", str(args.tail_tokens), "--route-cascade-tokens", str(args.cascade_tokens)]
    prompts = serve_work(reqs, args.serve_requests, args.output_tokens, args.seed)
    loads = [(f"{int(f * 100)}% small", mixed(prompts, f, "small", "target", args.output_tokens, args.seed))
             for f in args.serve_fractions]
    loads.append((f"auto {policy} @{int(f90 * 100)}%", [(p, args.output_tokens, "auto") for p in prompts]))
    runs: dict[str, list[dict]] = {label: [] for label, _ in loads}
    with ServerProcess(flags, args.tp, OUT / f"serve_tp{args.tp}.log") as server:
        asyncio.run(run_load(server.grpc, loads[0][1][:64], float("inf"), args.concurrency))  # warm-up
        for rep in range(args.repeats):
            order = loads if rep % 2 == 0 else loads[::-1]
            for label, work in order:
                results, elapsed = asyncio.run(run_load(server.grpc, work, float("inf"), args.concurrency))
                row = summarize(label, results, elapsed, 1e9, 1e9)
                row["served_small"] = sum(r.get("model") == "small" for r in results) / len(results)
                runs[label].append(row)
                print(f"  rep {rep} {label}: {row['out_tok_per_s']:.0f} tok/s", file=sys.stderr)
    base = runs[loads[0][0]]
    rows = []
    for label, _ in loads:
        rs = runs[label]
        rows.append({"load": label, "served_small": statistics.median(r["served_small"] for r in rs),
                     "out_tok_per_s": statistics.median(r["out_tok_per_s"] for r in rs),
                     "gain_vs_all_target": statistics.median(r["out_tok_per_s"] / b["out_tok_per_s"]
                                                             for r, b in zip(rs, base)),
                     "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rs),
                     "tpot_mean_ms": statistics.median(r["tpot_mean_ms"] for r in rs)})
    print(f"\noutput tokens/s at {args.concurrency} concurrent streams, TP {args.tp} ({args.repeats} repeats, "
          f"gain = median of paired ratios to 0% small):")
    print_table(rows, ["load", "served_small", "out_tok_per_s", "gain_vs_all_target", "ttft_p50_ms", "tpot_mean_ms"])
    payload = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "func"},
               "policy": policy, "fraction_pgr90": f90, "rows": rows, "runs": runs}
    write_json(OUT / f"serve_tp{args.tp}{args.tag}.json", payload)
    return payload


def write_calibration(args, path: Path) -> None:
    """Calibrate on prompts cut with another seed (not the quality set), through the CLI."""
    import subprocess

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    cal = cut_requests(tok, args.calibration_prompts, args.seed + 1000, args.max_prompt_tokens, 1)
    prompts = OUT / "calibration_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": r["prompt"]}) + "\n" for r in cal))
    subprocess.run([sys.executable, "-m", "tpserve.route", "calibrate", "--model", args.model, "--small-model",
                    args.small_model, "--prompts", str(prompts), "--out", str(path), "--dtype", "float32",
                    "--route-quantile", str(args.route_quantile), "--route-tail-tokens", str(args.tail_tokens),
                    "--route-cascade-tokens", str(args.cascade_tokens)], check=True, cwd=ROOT)


def run_placement(args) -> dict:
    """Every request on the small model: on rank 0 beside a TP-2 target (this design), served as
    its own model sharded over 2 ranks, and alone on 1 rank."""
    from tpserve.loadgen import run_load, summarize
    from tpserve.profile.server import ServerProcess

    data = json.loads((OUT / "quality.json").read_text())
    prompts = serve_work(data["requests"], args.serve_requests, args.output_tokens, args.seed)
    common = ["--dtype", "float32", "--max-num-seqs", "64", "--num-kv-blocks", "4096"]
    setups = [("rank 0 beside the TP-2 target", 2, ["--model", args.model, "--small-model", args.small_model,
                                                    "--small-model-name", "small", *common], "small"),
              ("sharded over 2 ranks", 2, ["--model", args.small_model, "--served-model-name", "small", *common], ""),
              ("alone on 1 rank", 1, ["--model", args.small_model, "--served-model-name", "small", *common], "")]
    rows = []
    for label, tp, flags, model in setups:
        work = [(p, args.output_tokens, model) for p in prompts]
        with ServerProcess(flags, tp, OUT / f"placement_{tp}_{len(rows)}.log") as server:
            asyncio.run(run_load(server.grpc, work[:64], float("inf"), args.concurrency))  # warm-up
            reps = []
            for _ in range(args.repeats):
                results, elapsed = asyncio.run(run_load(server.grpc, work, float("inf"), args.concurrency))
                reps.append(summarize(label, results, elapsed, 1e9, 1e9))
        rows.append({"small model": label, "out_tok_per_s": statistics.median(r["out_tok_per_s"] for r in reps),
                     "tpot_mean_ms": statistics.median(r["tpot_mean_ms"] for r in reps),
                     "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in reps)})
        print(f"  {label}: {rows[-1]['out_tok_per_s']:.0f} tok/s", file=sys.stderr)
    print(f"\nthe small model serving every request, {args.concurrency} concurrent streams:")
    print_table(rows, ["small model", "out_tok_per_s", "tpot_mean_ms", "ttft_p50_ms"])
    payload = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}
    write_json(OUT / "placement.json", payload)
    return payload


def run_drift(args) -> dict:
    """Calibrate on stdlib prompts, then serve other projects' code with --route-small-fraction:
    the fraction a threshold frozen at the calibration gives, against the online tracker's."""
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.route.router import AUTO, SMALL, RouteConfig, Router, ScoreTracker, load_calibration
    from tpserve.server.offline import generate

    policy = args.serve_policy or best_policy(json.loads((OUT / "quality.json").read_text())["summary"])
    cal_path = OUT / "calibration.json"
    if not cal_path.exists():
        write_calibration(args, cal_path)
    cal = load_calibration(str(cal_path))
    engine = load_engine(args)
    reqs = cut_requests(engine.tokenizer, args.drift_prompts, args.seed + 2000, args.max_prompt_tokens, 1,
                        other_projects_code())
    rows = []
    for fraction in args.drift_fractions:
        config = RouteConfig(policy=policy, small_fraction=fraction, aggregate_quantile=args.route_quantile,
                             tail_tokens=args.tail_tokens, cascade_tokens=args.cascade_tokens, window=args.window,
                             seed=args.seed)
        frozen = ScoreTracker(10_000, cal["quantiles"][policy]).threshold(fraction)
        for label, router in (("calibration threshold, frozen", Router(RouteConfig(**{**config.__dict__,
                                                                                      "threshold": frozen}))),
                              ("online tracker, seeded by the calibration", Router(config, cal))):
            engine.small.router = router
            served = []
            for start in range(0, len(reqs), args.drift_batch):  # arrivals in waves, as traffic comes
                chunk = [r["prompt"] for r in reqs[start:start + args.drift_batch]]
                res = generate(engine, chunk, SamplingParams(max_tokens=args.cascade_tokens, temperature=0.0),
                               model=AUTO)
                served += [r.model == SMALL for r in res]
            third = len(served) // 3
            rows.append({"asked": fraction, "threshold": label, "small_all": statistics.fmean(served),
                         "small_first_third": statistics.fmean(served[:third]),
                         "small_last_third": statistics.fmean(served[-third:])})
    print(f"\n{policy}: calibrated on {cal['num_prompts']} stdlib prompts, serving {len(reqs)} prompts of other "
          f"projects' code (site-packages), window {args.window}:")
    print_table(rows, ["asked", "threshold", "small_all", "small_first_third", "small_last_third"])
    payload = {"machine": machine_info(), "policy": policy, "rows": rows,
               "args": {k: v for k, v in vars(args).items() if k != "func"}}
    write_json(OUT / f"drift_{policy}.json", payload)
    return payload


def parse_args(argv=None):
    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "audit", "drift", "serve", "placement", "all"])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--small-model", default=str(DEFAULT_DRAFT_DIR))
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--min-prompt-tokens", type=int, default=48)
    p.add_argument("--prompt-chars", type=lambda s: tuple(int(x) for x in s.split(":")), default=(400, 4000),
                   help="LO:HI characters of text before the cut, tokenised, then LO:HI tokens kept")
    p.add_argument("--tag", default="", help="suffix of the quality JSON (a second prompt set)")
    p.add_argument("--continuation-tokens", type=int, default=64)
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p.add_argument("--route-quantile", type=float, default=0.1)
    p.add_argument("--tail-tokens", type=int, default=64)
    p.add_argument("--cascade-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--audit-policy", default=None, help="default: the best policy by APGR")
    p.add_argument("--audit-fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    p.add_argument("--audit-rate", type=float, default=1.0)
    p.add_argument("--audit-output-tokens", type=int, default=32)
    p.add_argument("--serve-policy", default=None, help="default: the best policy by APGR")
    p.add_argument("--serve-fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0, 0.25, 0.5, 0.75])
    p.add_argument("--serve-requests", type=int, default=192)
    p.add_argument("--auto-fraction", type=float, default=None,
                   help="the auto load's --route-small-fraction (default: the policy's largest with PGR >= 0.9)")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--calibration-prompts", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--window", type=int, default=200, help="the tracker's window in the drift run")
    p.add_argument("--drift-prompts", type=int, default=400)
    p.add_argument("--drift-batch", type=int, default=25)
    p.add_argument("--drift-fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = {"quality": run_quality, "audit": run_audit, "drift": run_drift, "serve": run_serve,
             "placement": run_placement}
    for name in (steps if args.what == "all" else [args.what]):
        steps[name](args)


if __name__ == "__main__":
    main()
