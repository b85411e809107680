"""Quality of weight-only quantisation: float32, bf16, int8 and int4 (several group sizes) weights
of one model, all run through tpserve's own forward at TP = 1 with float32 activations, so every
difference comes from the weights.

Per variant: perplexity on held-out text (the model directory's heldout_files.txt, paths relative
to this Python's stdlib; at most --max-tokens tokens in non-overlapping windows of --window),
bytes of all linear and embedding weights as stored (float32 at 4 bytes, bf16 at 2 bytes per
weight, evaluated as bf16-rounded weights in float32; quantised variants with their scales and
zeros, embeddings and LM head in the checkpoint's dtype), teacher-forced top-1 agreement with float32 at every
scored position, and exact match of --gen-tokens greedy continuations of --num-prompts prompts.
int8 / int4 checkpoints are written by `tpserve.quantize` (round-to-nearest) into a temp dir.

    python benchmarks/quant_quality.py [--model DIR] [--max-tokens 50000] [--groups 128 64 32]
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from common import machine_info, print_table, write_json


def heldout_tokens(model_dir: Path, max_tokens: int) -> list[int]:
    from tpserve.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise SystemExit(f"{model_dir} has no tokenizer")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for rel in (model_dir / "heldout_files.txt").read_text().split():
        path = stdlib / rel
        if not path.is_file():
            continue
        prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids += prefix + tok(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def weight_bytes(model, float_bytes: int, linear_only: bool = False) -> int:
    """Bytes of every linear and embedding tensor as a deployment stores it: float weights and
    biases at `float_bytes` each (the variant's dtype; every variant is evaluated in float32),
    quantised tensors (qweight, scales, zeros, act-order index) at their own size; tied once."""
    from tpserve.layers.embedding import VocabParallelEmbedding
    from tpserve.layers.linear import LinearBase

    kinds = LinearBase if linear_only else (LinearBase, VocabParallelEmbedding)
    seen, total = set(), 0
    for module in model.modules():
        if not isinstance(module, kinds):
            continue
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            size = float_bytes if name in ("weight", "bias") else t.element_size()
            total += t.numel() * size
    return total


def round_weights_bf16(model) -> None:
    from tpserve.layers.embedding import VocabParallelEmbedding
    from tpserve.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16).to(p.dtype)


def make_runner(model_dir, num_blocks: int, block_size: int):
    from tpserve.config import CacheConfig, ModelConfig
    from tpserve.distributed import TPGroup
    from tpserve.engine.model_runner import ModelRunner

    cfg = ModelConfig.from_dir(model_dir, "float32")
    return ModelRunner(cfg, CacheConfig(block_size=block_size, num_blocks=num_blocks), TPGroup(), model_dir,
                       show_progress=False)


def score(runner, windows: list[list[int]], batch: int) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL, argmax [positions]) over every window, `batch` windows per forward."""
    from tpserve.engine.step import SeqWork, StepPlan

    bs, n = runner.block_size, len(windows[0])
    per = -(-n // bs)
    nll, count, argmax = 0.0, 0, []
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        plan = StepPlan([SeqWork(i, w, 0, list(range(i * per, (i + 1) * per)), num_logits=n)
                         for i, w in enumerate(chunk)])
        logits = runner.execute(plan).view(len(chunk), n, -1)[:, :-1]
        targets = torch.tensor([w[1:] for w in chunk])
        logp = torch.log_softmax(logits, dim=-1)
        nll -= float(logp.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        argmax.append(logits.argmax(-1).flatten())
        runner.execute(StepPlan(finished=list(range(len(chunk)))))
    return nll / count, torch.cat(argmax)


def greedy(runner, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    from tpserve.engine.step import SeqWork, StepPlan

    per = -(-(max(map(len, prompts)) + num_tokens) // runner.block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    logits = runner.execute(StepPlan([SeqWork(i, p, 0, tables[i]) for i, p in enumerate(prompts)]))
    outs = [[int(row.argmax())] for row in logits]
    for step in range(1, num_tokens):
        plan = StepPlan([SeqWork(i, [o[-1]], len(p) + step - 1) for i, (p, o) in enumerate(zip(prompts, outs))])
        for o, row in zip(outs, runner.execute(plan)):
            o.append(int(row.argmax()))
    runner.execute(StepPlan(finished=list(range(len(prompts)))))
    return outs


def table_row(r: dict, num_prompts: int) -> dict:
    """Pre-formatted cells: perplexity differences need more digits than the shared table shows."""
    return {"variant": r["variant"], "weight_MiB": f"{r['weight_MiB']:.2f}", "linear_MiB": f"{r['linear_MiB']:.2f}",
            "bytes_vs_fp32": f"{r['bytes_vs_fp32']:.3f}", "ppl": f"{r['ppl']:.4f}",
            "ppl_vs_fp32": f"{r['ppl_vs_fp32_pct']:+.3f}%", "top1_agree": f"{r['top1_agree']:.4f}",
            "greedy_exact": f"{round(r['greedy_exact'] * num_prompts)}/{num_prompts}",
            "greedy_prefix_mean": f"{r['greedy_prefix_mean']:.1f}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="float checkpoint (default: the bundled target)")
    p.add_argument("--max-tokens", type=int, default=50_000)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch-windows", type=int, default=8, help="windows per forward")
    p.add_argument("--groups", type=int, nargs="*", default=[128, 64, 32], help="int4 group sizes")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 avoids oversubscription stalls next to other jobs)")
    p.add_argument("--output", default="out/quant_quality.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tpserve.bundled import DEFAULT_MODEL_DIR
    from tpserve.quantize import quantize_checkpoint

    from tpserve.config import ModelConfig

    torch.manual_seed(0)
    model_dir = Path(args.model or DEFAULT_MODEL_DIR)
    checkpoint_dtype = ModelConfig.from_dir(model_dir).dtype
    ids = heldout_tokens(model_dir, args.max_tokens)
    windows = [ids[i : i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    step = max(1, len(windows) // args.num_prompts)
    prompts = [w[: args.prompt_len] for w in windows[::step][: args.num_prompts]]
    print(f"{model_dir}: {len(windows)} windows x {args.window} tokens, {len(prompts)} greedy prompts")
    block_size = 16
    num_blocks = max(args.batch_windows * -(-args.window // block_size),
                     len(prompts) * -(-(args.prompt_len + args.gen_tokens) // block_size)) + 1

    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("float32", model_dir, None), ("bf16", model_dir, None)]
        variants.append(("int8", Path(tmp) / "int8", ("int8", 0)))
        variants += [(f"int4-g{g}", Path(tmp) / f"int4-g{g}", ("int4", g)) for g in args.groups]
        for label, path, quant in variants:
            if quant is not None:
                quantize_checkpoint(model_dir, path, quant[0], quant[1] or 128, log=lambda *_: None)
            t0 = time.perf_counter()
            runner = make_runner(path, num_blocks, block_size)
            if label == "bf16":
                round_weights_bf16(runner.model)
            nll, argmax = score(runner, windows, args.batch_windows)
            gen = greedy(runner, prompts, args.gen_tokens)
            # float32 / bf16 by name; quantised variants keep embeddings in the checkpoint's dtype.
            per_float = {"float32": 4, "bf16": 2}.get(label) or checkpoint_dtype.itemsize
            row = {"variant": label, "quantization": runner.model_config.quantization,
                   "weight_MiB": weight_bytes(runner.model, per_float) / 2**20,
                   "linear_MiB": weight_bytes(runner.model, per_float, linear_only=True) / 2**20,
                   "ppl": math.exp(nll), "nll": nll, "eval_s": time.perf_counter() - t0}
            if ref is None:
                ref = {"argmax": argmax, "gen": gen, "bytes": row["weight_MiB"], "ppl": row["ppl"]}
            row["bytes_vs_fp32"] = row["weight_MiB"] / ref["bytes"]
            row["ppl_vs_fp32_pct"] = 100 * (row["ppl"] / ref["ppl"] - 1)
            row["top1_agree"] = float((argmax == ref["argmax"]).float().mean())
            row["greedy_exact"] = sum(a == b for a, b in zip(gen, ref["gen"])) / len(gen)
            row["greedy_prefix_mean"] = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                            for a, b in zip(gen, ref["gen"])) / len(gen)
            rows.append(row)
            print(f"  {label}: ppl {row['ppl']:.3f}, top-1 agreement {row['top1_agree']:.4f} "
                  f"({row['eval_s']:.0f} s)")
            del runner
    print()
    print_table([table_row(r, len(prompts)) for r in rows],
                ["variant", "weight_MiB", "linear_MiB", "bytes_vs_fp32", "ppl", "ppl_vs_fp32", "top1_agree",
                 "greedy_exact", "greedy_prefix_mean"])
    write_json(args.output, {"model": str(model_dir), "tokens": len(windows) * args.window, "window": args.window,
                             "num_prompts": len(prompts), "prompt_len": args.prompt_len,
                             "gen_tokens": args.gen_tokens, "activations": "float32", "tp_size": 1,
                             "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
