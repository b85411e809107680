"""Speculative decoding on the bundled target/draft pair (or given ones).

Every speculation config (method x policy x k; adaptive uses k as its largest k) is measured
*paired* with no speculation: two freshly built engines in one process, the speculating one and a
plain one, that share one copy of the target's weights and serve the same seeded greedy requests,
taking turns one engine step at a time (which goes first alternates; over repeats, so does which
engine is built first, owns the weights and takes the first step). Each engine's time is the sum of its own
steps, so a burst of load from elsewhere on the machine lands on both and cancels in their ratio;
a config's ratio is the median over `--repeats` pairs (and the smallest is shown).

Policies: `fixed`; `adaptive`, a fresh controller, so its probing is paid inside the measured run;
`adaptive-warm`, measured after both engines served an untimed run of other prompts of the same
shape (the steady state of a server that has been serving this load). An `off control` pair (two
plain engines) shows how far the residual noise moves a ratio. Also reported, from the first
repeat (the same in every repeat for fixed k; an adaptive controller's timing-driven choices vary
between repeats): target forwards and their ratio, tokens per target forward, acceptance; the
medians of the adaptive controller's probes and of the share of the run's time they cost beyond
plain steps (catch-up included); and whether every output equals the plain engine's.

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
    spec = engine.stats().speculation
    if spec is None:
        return 0, 0, 0.0
    accepted, mean = spec.num_accepted_tokens, spec.mean_accepted_length
    return spec.num_proposed_tokens, accepted, accepted / mean if mean else 0.0


def step_together(engines, prompts, params) -> list[dict]:
    """Serve `prompts` on every engine, one step of each in turn (the first alternates): per engine,
    the seconds of its own steps, its steps and its outputs in prompt order."""
    from tpserve.server.requests import RequestFactory

    runs = []
    for i, engine in enumerate(engines):
        ids = [f"b{engine.num_steps}-{i}-{j}" for j in range(len(prompts))]
        factory = RequestFactory.for_engine(engine)
        for rid, prompt in zip(ids, prompts):
            engine.add_sequence(factory.make(rid, prompt_token_ids=prompt, params=params))
        runs.append({"engine": engine, "ids": ids, "tokens": {rid: [] for rid in ids}, "seconds": 0.0,
                     "steps0": engine.num_steps})
    turn = 0
    while any(r["engine"].has_work() for r in runs):
        order = runs if turn % 2 == 0 else runs[::-1]
        turn += 1
        for r in order:
            if not r["engine"].has_work():
                continue
            t0 = time.perf_counter()
            outs = r["engine"].step()
            r["seconds"] += time.perf_counter() - t0
            for out in outs:
                r["tokens"][out.request_id] += out.new_token_ids
    return [{"seconds": r["seconds"], "steps": r["engine"].num_steps - r["steps0"],
             "outputs": [r["tokens"][rid] for rid in r["ids"]]} for r in runs]


def run_pair(spec_args, plain_args, prompts, output_len, warm_prompts=None, plain_first=False):
    """One paired measurement of a config against no speculation (see the module docstring).
    `plain_first`: the plain engine is built first and owns the weights (alternated over repeats,
    so neither role's place in memory favours one side)."""
    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import build_runtime

    if plain_first:
        _, plain = build_runtime(plain_args, TPGroup())
        _, spec = build_runtime(spec_args, TPGroup())
    else:
        _, spec = build_runtime(spec_args, TPGroup())
        _, plain = build_runtime(plain_args, TPGroup())
    # One copy of the target's weights (the KV caches stay separate): the two engines read the
    # same memory, so neither is favoured by what the other left in the CPU caches.
    owner, borrower = (plain, spec) if plain_first else (spec, plain)
    borrower.driver.runner.model = owner.driver.runner.model
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    pair = [owner, borrower]  # the owner also takes the first step of every run (a prefill)
    step_together(pair, prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))
    if warm_prompts is not None:
        step_together(pair, warm_prompts, params)
    counts0 = _spec_counts(spec)
    ctrl = spec.spec.controller if spec.spec is not None else None
    probes0 = (ctrl.num_probes, ctrl.probe_seconds) if ctrl else (0, 0.0)
    runs = step_together(pair, prompts, params)
    mine, theirs = runs[::-1] if plain_first else runs
    probes, probe_seconds = ((ctrl.num_probes - probes0[0], ctrl.probe_seconds - probes0[1]) if ctrl else (0, 0.0))
    proposed, accepted, spec_steps = (b - a for a, b in zip(counts0, _spec_counts(spec)))
    tokens = sum(len(o) for o in mine["outputs"])
    return {"tok_per_s": tokens / mine["seconds"], "ratio": theirs["seconds"] / mine["seconds"],
            "target_forwards": mine["steps"], "plain_forwards": theirs["steps"],
            "tokens_per_forward": tokens / len(prompts) / max(1, mine["steps"]),
            "acceptance": accepted / proposed if proposed else None,
            "mean_accepted": accepted / spec_steps if spec_steps else None,
            "probes": probes, "probe_share": probe_seconds / mine["seconds"],
            "lossless": mine["outputs"] == theirs["outputs"]}


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
    # The control pairs two plain engines: its ratio shows the noise left after pairing.
    configs = [("off", "control", 0)] + [(m, pol, k) for m in args.methods for pol in args.policies for k in args.ks]
    rows = []
    for bs in args.batch_sizes:
        prompts = prompts_all[:bs]
        plain_args = EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(bs, 1))
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for repeat in range(args.repeats):
            for method, policy, k in configs:
                extra = {} if method == "off" else dict(
                    speculative_method=method, draft_model=draft if method == "draft" else None,
                    num_speculative_tokens=k, spec_policy=policy.removesuffix("-warm"))
                warm = warm_all[:bs] if "warm" in policy else None
                runs[(method, policy, k)].append(
                    run_pair(EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(bs, 1), **extra),
                             plain_args, prompts, args.output_len, warm, plain_first=repeat % 2 == 1))
        for method, policy, k in configs:
            rs = runs[(method, policy, k)]
            rows.append({
                "batch": bs, "method": method, "policy": policy, "k": k,
                "tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
                "speedup": statistics.median(r["ratio"] for r in rs),
                "speedup_min": min(r["ratio"] for r in rs),
                "target_forwards": rs[0]["target_forwards"],
                "forward_ratio": rs[0]["plain_forwards"] / rs[0]["target_forwards"],
                "warm_up": "same-shape run" if "warm" in policy else "1 request",
                "tokens_per_forward": rs[0]["tokens_per_forward"], "acceptance": rs[0]["acceptance"],
                "mean_accepted": rs[0]["mean_accepted"],
                "probes": statistics.median(r["probes"] for r in rs),
                "probe_share": statistics.median(r["probe_share"] for r in rs),
                "lossless": all(r["lossless"] for r in rs),
            })
            print(f"batch {bs} {method} {policy} k={k}: {rows[-1]['tok_per_s']:.1f} tok/s, "
                  f"x{rows[-1]['speedup']:.2f} (min x{rows[-1]['speedup_min']:.2f})", flush=True)
    print()
    print_table(rows, ["batch", "method", "policy", "k", "tok_per_s", "speedup", "speedup_min", "target_forwards",
                       "forward_ratio", "tokens_per_forward", "acceptance", "mean_accepted", "probes", "probe_share",
                       "lossless"])
    write_json(args.output, {"model": model, "draft": draft, "prompt_len": args.prompt_len,
                             "output_len": args.output_len, "repeats": args.repeats, "method": "paired",
                             "rows": rows,
                             "machine": machine_info()})


if __name__ == "__main__":
    main()
