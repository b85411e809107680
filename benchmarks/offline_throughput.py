"""Offline throughput: tpserve's engine against transformers `generate` with static padded batches.

Same machine, same weights, same requests, same run. transformers runs each batch until its longest
requested output (left-padded prompts, EOS ignored) and is credited only with the tokens each
request asked for; it is measured at several batch sizes and the best is compared.

    python benchmarks/offline_throughput.py [--model DIR] [--num-requests 64] [--output out/x.json]
    python benchmarks/offline_throughput.py --workload long-mixed [--tp 1 2] [--output out/y.json]

Workloads: `random` (the default: random token ids, prompt and output lengths uniform in
--prompt-len / --output-len) and `long-mixed` (prompts of 40-1,200 characters cut from the bundled
corpus's held-out Python files, outputs of 16, 32, 64, 128 or 256 tokens, EOS ignored). With
`long-mixed` the script also measures whole processes, model load included: launch/generate.py at
each --tp (torchrun for TP > 1) against a process running transformers at its best batch size.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_info, print_table, seeded_workload, write_json


def run_tpserve(model_dir, work, dtype, max_num_seqs, max_num_batched_tokens):
    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.server.offline import generate

    args = EngineArgs(model=str(model_dir), dtype=dtype, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens)
    runner, engine = build_runtime(args, TPGroup())
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    generate(engine, prompts[:2], params[:2])  # warm-up
    forward_time = 0.0
    execute = runner.execute

    def timed_execute(plan):
        nonlocal forward_time
        t = time.perf_counter()
        out = execute(plan)
        forward_time += time.perf_counter() - t
        return out

    runner.execute = timed_execute
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    results = generate(engine, prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return {"system": "tpserve", "batch": f"continuous<={max_num_seqs}", "output_tokens": tokens,
            "seconds": elapsed, "tok_per_s": tokens / elapsed, "steps": engine.num_steps - steps0,
            "overhead_frac": 1 - forward_time / elapsed}, [r.token_ids for r in results]


def run_transformers(model_dir, work, dtype, batch_size):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    pad = 0
    t0 = time.perf_counter()
    tokens = 0
    outputs = []
    for i in range(0, len(work), batch_size):
        batch = work[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(n for _, n in batch)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad, eos_token_id=None)
        for row, (_, n) in enumerate(batch):
            outputs.append(out[row, width : width + n].tolist())
            tokens += n
    elapsed = time.perf_counter() - t0
    return {"system": "transformers", "batch": str(batch_size), "output_tokens": tokens,
            "seconds": elapsed, "tok_per_s": tokens / elapsed}, outputs


def long_mixed_workload(model_dir, num_requests: int, seed: int) -> list[tuple[list[int], int]]:
    """Prompts of 40-1,200 characters of held-out Python (files the bundled models never trained
    on), outputs of 16-256 tokens."""
    import random

    from tpserve.bundled.corpus import load_corpus
    from tpserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    _, heldout = load_corpus()
    files = sorted(f for f, text in heldout.items() if len(text) > 1300)
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        text = heldout[rng.choice(files)]
        length = rng.randint(40, 1200)
        start = rng.randrange(len(text) - length)
        work.append((tokenizer.encode(text[start : start + length]), rng.choice([16, 32, 64, 128, 256])))
    return work


def whole_process(cmd: list[str]) -> float:
    """Seconds from spawning `cmd` to its exit (it must succeed)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def whole_process_rows(args, model_dir, work, best_batch: int) -> list[dict]:
    """launch/generate.py at each TP and a transformers process at `best_batch`, model load included."""
    import json
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp())
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": n, "temperature": 0.0, "ignore_eos": True})
                           + "\n" for p, n in work))
    tokens = sum(n for _, n in work)
    rows = []
    for tp in args.tp:
        launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", str(tp)]
        seconds = whole_process([*launcher, str(root / "launch" / "generate.py"), "--model", str(model_dir),
                                 "--input", str(inp), "--output", str(tmp / f"out{tp}.jsonl"), "--dtype", args.dtype,
                                 "--max-num-seqs", str(args.max_num_seqs)])
        rows.append({"system": f"tpserve TP{tp} (process)", "batch": f"continuous<={args.max_num_seqs}",
                     "output_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds})
    seconds = whole_process([sys.executable, __file__, "--workload", args.workload, "--model", str(model_dir),
                             "--num-requests", str(args.num_requests), "--seed", str(args.seed), "--dtype", args.dtype,
                             "--only-transformers-batch", str(best_batch)])
    rows.append({"system": "transformers (process)", "batch": str(best_batch), "output_tokens": tokens,
                 "seconds": seconds, "tok_per_s": tokens / seconds})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["random", "long-mixed"], default="random")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="long-mixed: whole-process runs of tpserve")
    p.add_argument("--only-transformers-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/offline_throughput.json")
    args = p.parse_args()

    from tpserve.bundled import DEFAULT_MODEL_DIR
    from tpserve.config import ModelConfig

    model_dir = args.model or DEFAULT_MODEL_DIR
    cfg = ModelConfig.from_dir(model_dir)
    if args.workload == "long-mixed":
        work = long_mixed_workload(model_dir, args.num_requests, args.seed)
    else:
        work = seeded_workload(args.num_requests, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len),
                               args.seed)
    dtype = getattr(torch, args.dtype)
    if args.only_transformers_batch:  # the whole-process measurement's child: load, run, exit
        run_transformers(model_dir, work, dtype, args.only_transformers_batch)
        return
    rows = []
    ours, our_tokens = run_tpserve(model_dir, work, args.dtype, args.max_num_seqs, args.max_num_batched_tokens)
    rows.append(ours)
    hf_rows = []
    for bs in args.hf_batch_sizes:
        row, hf_tokens = run_transformers(model_dir, work, dtype, bs)
        row["same_tokens_as_tpserve"] = sum(a == b for a, b in zip(our_tokens, hf_tokens)) / len(work)
        hf_rows.append(row)
    rows += hf_rows
    best = max(hf_rows, key=lambda r: r["tok_per_s"])
    ratio = ours["tok_per_s"] / best["tok_per_s"]
    print_table(rows, ["system", "batch", "output_tokens", "seconds", "tok_per_s", "steps", "overhead_frac",
                       "same_tokens_as_tpserve"])
    print(f"\ntpserve / best transformers (batch {best['batch']}): {ratio:.2f}x")
    ratios = {"in_process": ratio}
    if args.workload == "long-mixed":
        process_rows = whole_process_rows(args, model_dir, work, int(best["batch"]))
        print_table(process_rows, ["system", "batch", "output_tokens", "seconds", "tok_per_s"])
        hf = process_rows[-1]["tok_per_s"]
        for row in process_rows[:-1]:
            ratios[f"whole_process_{row['system'].split()[1]}"] = row["tok_per_s"] / hf
            print(f"{row['system']} / transformers process (batch {best['batch']}): {row['tok_per_s'] / hf:.2f}x")
        rows += process_rows
    write_json(args.output, {"model": str(model_dir), "dtype": args.dtype, "workload": args.workload,
                             "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                             "output_len": args.output_len, "rows": rows, "ratio_vs_best_transformers": ratio,
                             "ratios": ratios, "machine": machine_info()})


if __name__ == "__main__":
    main()
