"""Where a decode step's time goes: the bundled model in-process (TP 1, float32), a batch of B
sequences decoding at context length C, each engine step split into attention (its K/V gather
and the rest), the linear layers, the rest of the forward, sampling, and the engine's own work
(scheduling, the plan, updating, emitting: step time minus the forward and sampling).

    python benchmarks/decode_breakdown.py [--batches 1 16 64] [--contexts 64 512 16-1024]
        [--attention paged rows] [--steps 24] [--out benchmarks/results/decode_breakdown.json]

A context is one length for every sequence, or LO-HI for lengths drawn uniformly (the mixed case,
where padding wastes the most). --attention compares, in the same run, the CPU attention that
gathers every sequence's blocks each layer (paged: length buckets on, --no-contiguous-rows) with
the one that reads per-sequence contiguous rows (rows: tpserve.ops.kv_rows, the default).

Timers wrap the functions themselves (torch on CPU runs synchronously, so wall time is theirs).
The paged path's gather column is measured apart, on the same caches with the decode path's index
shapes (every sequence's context, every layer, K and V), and is part of the attention column; the
rows path's upkeep (row assignment, copies from the blocks for joining sequences, re-layouts, the
step's index tensors) is its own column, part of the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

from common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._active: list[str] = []

    @contextlib.contextmanager
    def patch(self, owner, name: str, label: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)

    def reset(self) -> None:
        self.total = {}


def context_lengths(spec: str, batch: int, seed: int) -> list[int]:
    """'512': every sequence at 512; 'LO-HI': uniform in [LO, HI] (seeded)."""
    import random

    if "-" not in spec:
        return [int(spec)] * batch
    lo, hi = map(int, spec.split("-"))
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(batch)]


def measure(model_dir: str, batch: int, context: str, steps: int, attention_path: str) -> dict:
    import torch

    from tpserve.distributed import TPGroup
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.ops import dispatch

    from tpserve.ops.kv_rows import KVRows

    lengths = context_lengths(context, batch, seed=batch)
    blocks = sum(-(-(n + steps + 8) // 16) for n in lengths) + 8
    runner, engine = build_runtime(EngineArgs(model=model_dir, dtype="float32", max_num_seqs=batch,
                                              num_kv_blocks=blocks, enable_prefix_caching=False,
                                              max_num_batched_tokens=max(2048, max(lengths)),
                                              contiguous_rows=attention_path == "rows"), TPGroup())
    vocab = engine.vocab_size
    g = torch.Generator().manual_seed(batch * 1000 + len(context))
    factory_params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    from tpserve.server.requests import RequestFactory

    factory = RequestFactory.for_engine(engine)
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, vocab, (n,), generator=g).tolist()
        engine.add_sequence(factory.make(f"r{i}", prompt_token_ids=prompt, params=factory_params))
    while any(not s.is_decoding for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the prefills
    for _ in range(2):
        engine.step()  # warm-up decode steps
    timers = Timers()
    step_times = []
    with timers.patch(runner, "execute", "forward"), \
            timers.patch(dispatch, "paged_attention_ref", "attention (after the cache write)"), \
            timers.patch(dispatch, "write_kv_cache", "K/V cache write"), \
            timers.patch(dispatch, "rows_attention", "rows attention"), \
            timers.patch(dispatch, "write_rows", "rows write"), \
            timers.patch(KVRows, "prepare", "rows upkeep"), \
            timers.patch(dispatch, "linear", "linear layers"), \
            timers.patch(engine, "_sample", "sampling"):
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - started)
    t = timers.total
    n = len(step_times)
    step = statistics.mean(step_times)
    per = {k: v / n for k, v in t.items()}
    forward = per.get("forward", 0.0)
    attention = sum(per.get(k, 0.0) for k in ("attention (after the cache write)", "K/V cache write",
                                              "rows attention", "rows write"))
    upkeep = per.get("rows upkeep", 0.0)
    linear = per.get("linear layers", 0.0)
    sampling = per.get("sampling", 0.0)
    gather = gather_share(runner, lengths) if attention_path == "paged" else 0.0
    row = {"batch": batch, "context": context, "attention": attention_path, "step_ms": step * 1e3,
           "attention_ms": attention * 1e3, "of_which_gather_ms": min(attention, gather) * 1e3,
           "rows_upkeep_ms": upkeep * 1e3, "linear_ms": linear * 1e3,
           "other_forward_ms": (forward - attention - linear - upkeep) * 1e3,
           "sampling_ms": sampling * 1e3, "engine_overhead_ms": (step - forward - sampling) * 1e3,
           "engine_overhead_pct": 100 * (step - forward - sampling) / step,
           "tok_per_s": batch / step}
    return row


def gather_share(runner, lengths: list[int]) -> float:
    """Per step: the time of the K/V gathers alone (every sequence's context, padded to its
    bucket's longest, for every layer, K and V), on the same caches and index shapes as the
    decode attention."""
    import torch

    from tpserve.ops.attention import _length_buckets

    k_cache, v_cache = runner.kv_caches[0]
    num_layers = len(runner.kv_caches)
    block_size, num_kv, head_dim = k_cache.shape[1:]
    flat_k, flat_v = k_cache.view(-1, num_kv, head_dim), v_cache.view(-1, num_kv, head_dim)
    lengths = [n + 2 for n in lengths]
    runs = _length_buckets(list(range(len(lengths))), lengths)
    index = []
    for run in runs:
        longest = max(lengths[i] for i in run)
        pos = torch.arange(longest)
        index.append((pos % (k_cache.shape[0] * block_size)).repeat(len(run), 1))
    for _ in range(2):
        for slots in index:
            flat_k[slots], flat_v[slots]
    started = time.perf_counter()
    reps = 5
    for _ in range(reps):
        for _ in range(num_layers):
            for slots in index:
                flat_k[slots].transpose(1, 2)
                flat_v[slots].transpose(1, 2)
    return (time.perf_counter() - started) / reps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled model")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", nargs="+", default=["64", "512", "16-1024"],
                   help="a context length, or LO-HI for lengths uniform in [LO, HI]")
    p.add_argument("--attention", nargs="+", default=["paged", "rows"], choices=["paged", "rows"],
                   help="CPU attention paths to compare (paged: gather the blocks; rows: contiguous rows)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--tag", default="", help="a label for this run (before / after a change)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_breakdown.json"))
    args = p.parse_args()
    from tpserve.bundled import DEFAULT_MODEL_DIR

    model_dir = args.model or str(DEFAULT_MODEL_DIR)
    rows = [measure(model_dir, b, c, args.steps, a) for c in args.contexts for b in args.batches for a in args.attention]
    columns = ["batch", "context", "attention", "step_ms", "attention_ms", "of_which_gather_ms", "rows_upkeep_ms",
               "linear_ms", "other_forward_ms", "sampling_ms", "engine_overhead_ms", "engine_overhead_pct", "tok_per_s"]
    print_table(rows, columns)
    write_json(args.out, {"machine": machine_info(), "model": model_dir, "tag": args.tag, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
