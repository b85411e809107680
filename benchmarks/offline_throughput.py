"""Offline throughput: tpserve's engine against transformers `generate` with static padded batches.

Same machine, same weights, same requests, same run. transformers runs each batch until its longest
requested output (left-padded prompts, EOS ignored) and is credited only with the tokens each
request asked for; it is measured at several batch sizes and the best is compared.

    python benchmarks/offline_throughput.py [--model DIR] [--num-requests 64] [--output out/x.json]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    work = seeded_workload(args.num_requests, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len),
                           args.seed)
    dtype = getattr(torch, args.dtype)
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
    write_json(args.output, {"model": str(model_dir), "dtype": args.dtype, "num_requests": args.num_requests,
                             "prompt_len": args.prompt_len, "output_len": args.output_len, "rows": rows,
                             "ratio_vs_best_transformers": ratio, "machine": machine_info()})


if __name__ == "__main__":
    main()
