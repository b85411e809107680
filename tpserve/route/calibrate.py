"""`python -m tpserve.route calibrate`: the router's score distribution over a set of prompts.

    python -m tpserve.route calibrate --model DIR --small-model DIR --prompts FILE --out FILE \
        [--policies length,confidence,cascade] [--route-quantile 0.1] [--route-tail-tokens 64] \
        [--route-cascade-tokens 8] [--dtype float32]

Runs the engine in this process (the scores come from the small model on rank 0, so tensor
parallelism does not change them) with each policy's router, every prompt as an `auto` request,
and records each score exactly as a server computes it. The file holds each policy's score
quantiles (0 %, 1 %, ... 100 %), the settings they depend on, and for reading, the threshold that
sends 5 %, 10 %, ... 95 % of these prompts to the small model. `--route-calibration FILE` seeds the
server's online tracker with them; the scores of the traffic it serves then replace them.

Prompts: JSONL lines of {"prompt": text} or {"prompt_token_ids": [ids]} (the profiler's dataset format).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpserve.errors import ConfigError

SETTINGS = ("aggregate_quantile", "tail_tokens", "cascade_tokens", "length_small")
CALIBRATED_POLICIES = ("length", "confidence", "cascade", "gap")  # random's threshold is exact without one


def score_prompts(engine, prompts: list, config) -> list[float | None]:
    """Each prompt's score under `config`'s policy, computed by `engine` as a server would (the
    threshold is -inf, so every request stays on the small model until it is scored); None for a
    prompt with no score (one token: nothing to score)."""
    from dataclasses import replace

    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.route.router import AUTO, Router
    from tpserve.server.offline import generate

    saved = engine.small.router
    engine.small.router = Router(replace(config, threshold=float("-inf"), audit_rate=0.0))
    try:
        max_tokens = config.cascade_tokens if config.policy == "cascade" else 1
        results = generate(engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), model=AUTO)
    finally:
        engine.small.router = saved
    return [r.route.score if r.route is not None else None for r in results]


def quantiles(scores: list[float]) -> list[float]:
    from tpserve.route.router import quantile

    return [quantile(scores, i / 100) for i in range(101)]


def calibration(scores: dict[str, list[float]], config, model: str, small_model: str) -> dict:
    from tpserve.route.router import ScoreTracker

    out = {"model": model, "small_model": small_model, "num_prompts": len(next(iter(scores.values()))),
           **{key: getattr(config, key) for key in SETTINGS}, "quantiles": {}, "thresholds": {}}
    for policy, values in scores.items():
        out["quantiles"][policy] = quantiles(values)
        tracker = ScoreTracker(len(values), values)  # thresholds exactly as a server's tracker gives them
        out["thresholds"][policy] = {f"{f / 100:.2f}": tracker.threshold(f / 100) for f in range(5, 100, 5)}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tpserve.route calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the target's directory")
    p.add_argument("--small-model", required=True, help="the small model's directory")
    p.add_argument("--prompts", required=True, help="JSONL prompts")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--policies", default=",".join(CALIBRATED_POLICIES))
    p.add_argument("--route-quantile", type=float, default=0.1)
    p.add_argument("--route-tail-tokens", type=int, default=64)
    p.add_argument("--route-cascade-tokens", type=int, default=8)
    p.add_argument("--route-length-small", choices=["short", "long"], default="short")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-kv-blocks", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from tpserve.distributed import TPGroup
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.profile.workload import LengthDist, load_dataset
    from tpserve.route.router import RouteConfig

    args = parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    bad = [p for p in policies if p not in CALIBRATED_POLICIES]
    if bad:
        raise ConfigError(f"--policies: {bad[0]!r} is not one of {', '.join(CALIBRATED_POLICIES)}")
    _, engine = build_runtime(EngineArgs(model=args.model, dtype=args.dtype, small_model=args.small_model,
                                         num_kv_blocks=args.num_kv_blocks), TPGroup(device=torch.device("cpu")))
    prompts = [ids for ids, _ in load_dataset(args.prompts, engine.tokenizer, LengthDist(1, 1), seed=0)]
    scores = {}
    for policy in policies:
        config = RouteConfig(policy=policy, aggregate_quantile=args.route_quantile, tail_tokens=args.route_tail_tokens,
                             cascade_tokens=args.route_cascade_tokens, length_small=args.route_length_small)
        scores[policy] = [s for s in score_prompts(engine, prompts, config) if s is not None]
        print(f"{policy}: {len(prompts)} prompts scored, median {quantiles(scores[policy])[50]:.4f}", file=sys.stderr)
    out = calibration(scores, config, args.model, args.small_model)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def cli(argv=None) -> int:
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
