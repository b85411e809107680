"""Speculative decoding on the bundled target/draft pair (or given ones).

For each batch size, runs the same seeded greedy requests without speculation and with every
speculation config (method x policy x k; adaptive uses k as its largest k), `--repeats` times in
interleaved order, each run on a freshly built engine. Policies: `fixed`; `adaptive`, a fresh
controller, so its probing is paid inside the measured run; `adaptive-warm`, measured after an
untimed run of other prompts of the same shape, the steady state of a server that has been
serving this load (compared with no speculation after the same warm-up run). Reports the median
output tokens/s, the median and the smallest of the per-repeat ratios to no speculation (wall
clock), the ratio of target forwards, tokens per target forward, acceptance, and whether every
output equals the non-speculative output. An `off control` row repeats the no-speculation config
as if it were another one: its ratios show how far this machine's noise alone moves a ratio.

    python benchmarks/spec_decode.py [--batch-sizes 1 4 16 64] [--ks 2 4 6] [--methods draft ngram]
                                     [--policies fixed adaptive adaptive-warm] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from common import machine_info, print_table, write_json


def heldout_prompts(model_dir, tokenizer, n, prompt_tokens, seed):
    """Windows of held-out standard-library code (what the bundled pair was not trained on)."""
    import sysconfig
    from pathlib import Path

    files = (Path(model_dir) / "heldout_files.txt").read_text().split()
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        path = root / rng.choice(files)
        try:
            ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) > prompt_tokens + 1:
            start = rng.randrange(len(ids) - prompt_tokens)
            prompts.append(ids[start : start + prompt_tokens])
    return prompts


def _spec_counts(engine) -> tuple[int, int, float]:
    spec = engine.stats()["speculation"] or {}
    accepted = spec.get("num_accepted_tokens", 0)
    mean = spec.get("mean_accepted_length") or 0.0
    return spec.get("num_proposed_tokens", 0), accepted, accepted / mean if mean else 0.0


def run(engine_args, prompts, output_len, warm_prompts=None):
    """Time one generate over `prompts` on a fresh engine. Before it, a tiny warm-up request, or
    with `warm_prompts` a whole untimed run of the same shape (the steady state of a server that
    has been serving this load: an adaptive controller has already learned this batch size)."""
    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import build_runtime

    _, engine = build_runtime(engine_args, TPGroup())
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))
    if warm_prompts is not None:
        engine.generate(warm_prompts, params)
    steps0, counts0 = engine.num_steps, _spec_counts(engine)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    proposed, accepted, spec_steps = (b - a for a, b in zip(counts0, _spec_counts(engine)))
    forwards = engine.num_steps - steps0
    return {"tok_per_s": tokens / elapsed, "target_forwards": forwards,
            "tokens_per_forward": tokens / len(prompts) / max(1, forwards),
            "acceptance": accepted / proposed if proposed else None,
            "mean_accepted": accepted / spec_steps if spec_steps else None,
            "outputs": [r.token_ids for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--methods", nargs="+", choices=["draft", "ngram"], default=["draft", "ngram"])
    p.add_argument("--policies", nargs="+", choices=["fixed", "adaptive", "adaptive-warm"],
                   default=["fixed", "adaptive", "adaptive-warm"],
                   help="adaptive: a fresh controller (its probing is paid inside the run); adaptive-warm: "
                        "after an untimed run of other prompts of the same shape (steady state)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per config; medians are reported")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/spec_decode.json")
    args = p.parse_args()

    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR
    from tpserve.engine.setup import EngineArgs
    from tpserve.tokenizer import load_tokenizer

    model = args.model or str(DEFAULT_MODEL_DIR)
    draft = args.draft_model or str(DEFAULT_DRAFT_DIR)
    tokenizer = load_tokenizer(model)
    prompts_all = heldout_prompts(model, tokenizer, max(args.batch_sizes), args.prompt_len, args.seed)
    warm_all = heldout_prompts(model, tokenizer, max(args.batch_sizes), args.prompt_len, args.seed + 1)
    configs = [("off", "-", 0)] + [(m, pol, k) for m in args.methods for pol in args.policies for k in args.ks]
    # A second, identical no-speculation config: its ratio to the first shows this machine's noise.
    configs.insert(1, ("off", "control", 0))
    if "adaptive-warm" in args.policies:
        configs.insert(1, ("off", "warm", 0))  # the baseline of the warm rows: same warm-up, no speculation
    rows = []
    for bs in args.batch_sizes:
        prompts = prompts_all[:bs]
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for method, policy, k in configs:
                extra = {} if method == "off" else dict(
                    speculative_method=method, draft_model=draft if method == "draft" else None,
                    num_speculative_tokens=k, spec_policy=policy.removesuffix("-warm"))
                warm = warm_all[:bs] if "warm" in policy else None
                runs[(method, policy, k)].append(
                    run(EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(bs, 1), **extra), prompts,
                        args.output_len, warm))
        for method, policy, k in configs:
            rs = runs[(method, policy, k)]
            base = runs[("off", "warm", 0)] if "warm" in policy else runs[("off", "-", 0)]
            rows.append({
                "batch": bs, "method": method, "policy": policy, "k": k,
                "tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
                "speedup": statistics.median(r["tok_per_s"] / b["tok_per_s"] for r, b in zip(rs, base)),
                "speedup_min": min(r["tok_per_s"] / b["tok_per_s"] for r, b in zip(rs, base)),
                "target_forwards": rs[0]["target_forwards"],
                "forward_ratio": base[0]["target_forwards"] / rs[0]["target_forwards"],
                "warm_up": "same-shape run" if "warm" in policy else "1 request",
                "tokens_per_forward": rs[0]["tokens_per_forward"], "acceptance": rs[0]["acceptance"],
                "mean_accepted": rs[0]["mean_accepted"],
                "lossless": all(r["outputs"] == base[0]["outputs"] for r in rs),
            })
            print(f"batch {bs} {method} {policy} k={k}: {rows[-1]['tok_per_s']:.1f} tok/s, "
                  f"x{rows[-1]['speedup']:.2f} (min x{rows[-1]['speedup_min']:.2f})", flush=True)
    print()
    print_table(rows, ["batch", "method", "policy", "k", "tok_per_s", "speedup", "speedup_min", "target_forwards",
                       "forward_ratio", "tokens_per_forward", "acceptance", "mean_accepted", "lossless"])
    write_json(args.output, {"model": model, "draft": draft, "prompt_len": args.prompt_len,
                             "output_len": args.output_len, "repeats": args.repeats, "rows": rows,
                             "machine": machine_info()})


if __name__ == "__main__":
    main()
