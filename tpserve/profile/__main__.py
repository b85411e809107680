"""python -m tpserve.profile: sweep batch sizes to the memory limit, plot throughput against
latency, pick the operating point that meets the SLO and write the server flags for it.

    python -m tpserve.profile --tp 2 --slo-ttft-p95 1 --min-tokens-per-user 20 --out out/profile
    torchrun --nproc-per-node 2 launch/serve.py --operating-point out/profile/operating_point.json

With `--model DIR --tp N [server flags]` (default: the bundled model, TP 1) it starts a server for
every candidate point (torchrun, free ports, health-checked, drained at the end); any flag it does
not know goes to the server as is. With `--server URL` it loads a running server instead and
sweeps only the client concurrency. The output directory gets report.json, points.csv,
report.md, throughput_vs_ttft.png, throughput_vs_per_user.png, latency_vs_batch.png and
operating_point.json; runs.jsonl keeps every finished run, so rerunning an interrupted sweep
resumes it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

from tpserve.errors import ConfigError
from tpserve.loadgen import run_load
from tpserve.profile.report import choose, write_all
from tpserve.profile.sweep import (MIN_GAIN, PATIENCE, SLO, Candidate, RunStore, Settings, aggregate, candidate_flags,
                                   measure_run, variant_dir)
from tpserve.profile.workload import LengthDist, load_dataset, sample_runs, synthetic


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m tpserve.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model directory (default: the bundled model); with --server, the served model's directory, "
                        "whose tokenizer makes the prompts")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (torchrun --nproc-per-node)")
    p.add_argument("--server", default=None,
                   help="measure this running server instead (http://HOST:PORT, or a gRPC HOST:PORT without metrics)")
    p.add_argument("--out", default="out/profile", help="output directory")
    p.add_argument("--fresh", action="store_true", help="discard the runs an earlier sweep left in --out")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="the load's protocol")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", default=None, help="JSONL: prompt or prompt_token_ids, optional output_len")
    w.add_argument("--input-len", default="128:512", help="prompt tokens: N or LO:HI (synthetic prompts)")
    w.add_argument("--output-len", default="64:128", help="output tokens: N or LO:HI")
    w.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("sweep")
    s.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256,512",
                   help="--max-num-seqs values (and client concurrency), in increasing order")
    s.add_argument("--max-num-batched-tokens", default=None, help="comma-separated token budgets to sweep as well")
    s.add_argument("--variants", default="float", help="comma-separated: float, int8, int4 (made with tpserve.quantize)")
    s.add_argument("--speculation", default="off", help="comma-separated: off, draft, ngram")
    s.add_argument("--draft-model", default=None, help="draft for --speculation draft (default: the bundled draft)")
    s.add_argument("--rounds", type=int, default=4, help="measured requests per point = max(--min-requests, rounds x batch)")
    s.add_argument("--min-requests", type=int, default=16)
    s.add_argument("--repeats", type=int, default=1, help="measured runs per point (the spread is reported)")
    o = p.add_argument_group("SLO and objective")
    o.add_argument("--slo-ttft-p95", type=float, default=None, help="seconds")
    o.add_argument("--slo-tpot-p95", type=float, default=None, help="seconds")
    o.add_argument("--min-tokens-per-user", type=float, default=None, help="tokens/s each user gets (at the p95 TPOT)")
    o.add_argument("--objective", choices=["throughput", "latency"], default="throughput")
    args, server_flags = p.parse_known_args(argv)
    if args.server and server_flags:
        p.error(f"with --server the running server keeps its flags; {' '.join(server_flags)} would be ignored")
    return args, server_flags


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers") from None
    if not values or any(v < 1 for v in values) or values != sorted(set(values)):
        raise ConfigError(f"{flag} {text!r} must be positive and increasing")
    return values


def candidates_of(args) -> list[Candidate]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    specs = [v.strip() for v in args.speculation.split(",") if v.strip()]
    for v in variants:
        if v not in ("float", "int8", "int4"):
            raise ConfigError(f"--variants: {v!r} is not one of float, int8, int4")
    for v in specs:
        if v not in ("off", "draft", "ngram"):
            raise ConfigError(f"--speculation: {v!r} is not one of off, draft, ngram")
    budgets = int_list(args.max_num_batched_tokens, "--max-num-batched-tokens") if args.max_num_batched_tokens \
        else [None]
    return [Candidate(v, sp, b) for v in variants for sp in specs for b in budgets]


def main(argv=None) -> int:
    args, server_flags = parse_args(argv)
    from tqdm import tqdm

    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR
    from tpserve.config import ModelConfig

    model = str(Path(args.model or DEFAULT_MODEL_DIR).resolve())
    draft = args.draft_model or (str(DEFAULT_DRAFT_DIR) if args.model is None else None)
    batches = int_list(args.batch_sizes, "--batch-sizes")
    candidates = [Candidate()] if args.server else candidates_of(args)
    slo = SLO(args.slo_ttft_p95, args.slo_tpot_p95, args.min_tokens_per_user)
    tokenizer = _tokenizer(model)
    output_len = LengthDist.parse(args.output_len, "--output-len")
    if args.dataset:
        pool = load_dataset(args.dataset, tokenizer, output_len, args.seed)
        workload = {"dataset": str(Path(args.dataset).resolve()), "output_len": str(output_len)}

        def make_work(n: int, seed: int):
            return sample_runs(pool, n, seed)
    else:
        input_len = LengthDist.parse(args.input_len, "--input-len")
        vocab = ModelConfig.from_dir(model).vocab_size
        workload = {"synthetic": "held-out code", "input_len": str(input_len), "output_len": str(output_len)}

        def make_work(n: int, seed: int):
            return synthetic(n, input_len, output_len, tokenizer, vocab, seed)
    settings = Settings(model, args.tp, args.protocol, args.server, server_flags, workload,
                        {"rounds": args.rounds, "min_requests": args.min_requests}, args.repeats, args.seed,
                        [asdict(c) for c in candidates])
    out = Path(args.out)
    store = RunStore(out, settings, args.fresh)
    points, stops, flags_of = [], {}, {}
    bar = tqdm(total=len(candidates) * len(batches) * args.repeats, unit="run", desc="profile", file=sys.stderr)
    try:
        for cand in candidates:
            model_dir = model if args.server else variant_dir(model, cand.variant, out)
            best, flat = None, 0
            for index, batch in enumerate(batches):
                n = max(args.min_requests, args.rounds * batch)
                # A running server keeps its own flags: its operating point is the concurrency to allow.
                flags = ["--max-num-seqs", str(batch)] if args.server else \
                    [*candidate_flags(cand, batch, model_dir, draft), *server_flags]
                flags_of[(cand.name, batch)] = flags
                done = store.of(cand.name, batch)
                bar.set_postfix_str(f"{cand.name} batch {batch}")
                if len(done) < args.repeats:
                    measure_point(args, cand, batch, flags, n, make_work, slo, store, out, bar, len(done))
                else:
                    bar.update(args.repeats)
                point = aggregate(store.of(cand.name, batch)[: args.repeats], slo)
                points.append(point)
                grew = best is None or point["out_tok_per_s"] >= best["out_tok_per_s"] * (1 + MIN_GAIN)
                flat = 0 if grew else flat + 1
                best = point if best is None or point["out_tok_per_s"] > best["out_tok_per_s"] else best
                stop = None
                if point["over_memory"]:
                    stop = (f"batch {batch}: the KV cache could not hold the batch "
                            f"({point['preemptions']:.0f} preemptions, {point['rejected']:.0f} rejections)")
                elif flat >= PATIENCE:
                    stop = (f"batch {batch}: throughput stopped growing ({PATIENCE} larger batches without "
                            f"{MIN_GAIN:.0%} over the best, {best['out_tok_per_s']:.1f} tok/s at batch "
                            f"{best['batch_size']})")
                elif index == len(batches) - 1:
                    stop = f"the last batch size given ({batch})"
                if stop:
                    stops[cand.name] = stop
                    bar.total -= (len(batches) - index - 1) * args.repeats
                    bar.refresh()
                    break
    finally:
        bar.close()
    best, why = choose(points, slo, args.objective)
    best_flags = None
    if best is not None:
        best_flags = [f for f in flags_of[(best["candidate"], best["batch_size"])]]
    write_all(out, points, store.runs, best, why, slo, args.objective, asdict(settings), stops, best_flags)
    print(("chosen: " if best else "") + why)
    print(f"wrote {out}/report.md, report.json, points.csv, the plots" + (", operating_point.json" if best else ""))
    return 0 if best is not None else 3


def measure_point(args, cand: Candidate, batch: int, flags: list[str], n: int, make_work, slo: SLO,
                  store: RunStore, out: Path, bar, already: int) -> None:
    """Warm up, then the missing measured runs of one point (a server of its own unless --server).
    Every run draws prompts of its own (seeded by the point and the repeat), so no run is served
    from the prefix cache another filled."""
    base = zlib.crc32(f"{args.seed}/{cand.name}/{batch}".encode())
    warm = [(p, min(k, 8)) for p, k in make_work(batch, base + 1000)]  # fills the batch once; not counted

    def runs(target: str, http: str | None) -> None:
        asyncio.run(run_load(target, warm, float("inf"), batch, args.seed))
        for r in range(already, args.repeats):
            row = measure_run(target, http, make_work(n, base + r), batch, slo, args.seed + r,
                              own_server=not args.server)
            store.add({"candidate": cand.name, "batch_size": batch, "repeat": r, **row})
            bar.update(1)

    if args.server:
        http = args.server if args.server.startswith("http://") else None
        runs(args.server, http)
        return
    from tpserve.profile.server import ServerProcess

    log = out / "logs" / f"{cand.name}-b{batch}.log"
    with ServerProcess(flags, args.tp, log) as srv:
        runs(srv.http if args.protocol == "http" else srv.grpc, srv.http)


def _tokenizer(model: str):
    if not (Path(model) / "tokenizer_config.json").exists() and not (Path(model) / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def cli(argv=None) -> int:
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stop the running server on the way out, as Ctrl-C does
    try:
        return main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished runs are kept in --out/runs.jsonl; the same command resumes the sweep",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
