"""Speculative decoding on the bundled target/draft pair (or given ones).

For each batch size, runs the same seeded greedy requests without speculation, then with k in
--ks both fixed and adaptive (k is then the largest k). Reports output tokens/s, tokens per target
forward, acceptance rate, and the ratios to no speculation (wall clock and target forwards).

    python benchmarks/spec_decode.py [--batch-sizes 1 4 16 64] [--ks 2 4 6] [--output-len 64]
"""

from __future__ import annotations

import argparse
import random
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


def run(engine_args, prompts, output_len):
    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import build_runtime

    _, engine = build_runtime(engine_args, TPGroup())
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    spec = engine.stats()["speculation"] or {}
    return {"tok_per_s": tokens / elapsed, "target_forwards": engine.num_steps - steps0,
            "tokens_per_forward": tokens / len(prompts) / max(1, (engine.num_steps - steps0)),
            "acceptance": spec.get("acceptance_rate"), "mean_accepted": spec.get("mean_accepted_length"),
            "outputs": [r.token_ids for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
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
    prompts_all = heldout_prompts(model, load_tokenizer(model), max(args.batch_sizes), args.prompt_len, args.seed)
    rows = []
    for bs in args.batch_sizes:
        prompts = prompts_all[:bs]
        base_args = EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(bs, 1))
        base = run(base_args, prompts, args.output_len)
        rows.append({"batch": bs, "mode": "off", "k": 0, **{k: v for k, v in base.items() if k != "outputs"},
                     "speedup": 1.0, "forward_ratio": 1.0, "lossless": True})
        for policy in ("fixed", "adaptive"):
            for k in args.ks:
                spec_args = EngineArgs(model=model, dtype=args.dtype, max_num_seqs=max(bs, 1),
                                       speculative_method="draft", draft_model=draft, num_speculative_tokens=k,
                                       spec_policy=policy)
                r = run(spec_args, prompts, args.output_len)
                rows.append({"batch": bs, "mode": policy, "k": k, **{x: v for x, v in r.items() if x != "outputs"},
                             "speedup": r["tok_per_s"] / base["tok_per_s"],
                             "forward_ratio": base["target_forwards"] / r["target_forwards"],
                             "lossless": r["outputs"] == base["outputs"]})
                print(f"batch {bs} {policy} k={k}: {rows[-1]['tok_per_s']:.1f} tok/s, x{rows[-1]['speedup']:.2f}",
                      flush=True)
    print()
    print_table(rows, ["batch", "mode", "k", "tok_per_s", "speedup", "target_forwards", "forward_ratio",
                       "tokens_per_forward", "acceptance", "mean_accepted", "lossless"])
    write_json(args.output, {"model": model, "draft": draft, "prompt_len": args.prompt_len,
                             "output_len": args.output_len, "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
