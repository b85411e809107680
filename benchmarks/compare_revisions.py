"""Two revisions of tpserve's engine, paired step by step in one process.

The base revision (any git ref) is extracted with `git archive` into a temporary directory and
imported as `tpserve_base` (its imports renamed) beside this checkout's `tpserve`. For each
workload and repeat, both revisions build their engine for the same model, share the weight
tensors (the KV caches stay separate), and serve the same seeded greedy requests, taking turns one
engine step at a time; which goes first alternates every step, and over repeats which is built
first and which takes the first (prefill) step alternate independently. Each side's time is the sum of its own steps, so a burst of load from
elsewhere on the machine lands on both and cancels in their ratio (`speed`: base seconds / head
seconds, above 1 when the head is faster; the median and the range over the repeats). The forward
passes are timed too: what is left of a step, rank 0's own work (`overhead`, ms per step), is
where two revisions of the engine's middle differ. Outputs of the two must be equal token for
token. (A revision whose engine drops the workers' block tables of finished requests in a step of
its own takes one more, empty, step at the end; it is counted.)

Workloads: `offline` (benchmarks/offline_throughput.py's requests: 64 prompts of 16-256 tokens,
16-128 output tokens, continuous batching up to 64) and `spec-METHOD-POLICY-kK-bB` (the
speculative decoding benchmark's held-out prompts of 64 tokens and 64 output tokens, at batch B,
METHOD draft / ngram / none, POLICY fixed / adaptive).

    python benchmarks/compare_revisions.py --base REF [--workloads offline spec-draft-fixed-k2-b1 ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, seeded_workload, write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKLOADS = ["offline", "spec-none-fixed-k0-b1", "spec-none-fixed-k0-b64", "spec-draft-fixed-k4-b1",
                     "spec-draft-adaptive-k4-b64", "spec-ngram-adaptive-k4-b1", "spec-ngram-adaptive-k4-b64"]


def extract_base(ref: str, into: Path) -> str:
    """Check `ref`'s tpserve (and top-level kernels, if it has them) out into `into`, renamed to
    tpserve_base; returns the package name."""
    names = [n for n in ("tpserve", "kernels") if subprocess.run(
        ["git", "cat-file", "-e", f"{ref}:{n}"], cwd=ROOT, capture_output=True).returncode == 0]
    archive = subprocess.run(["git", "archive", ref, *names], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "tpserve").rename(into / "tpserve_base")
    pattern = re.compile(r"\b(from|import) tpserve\b")
    for path in into.rglob("*.py"):
        path.write_text(pattern.sub(r"\1 tpserve_base", path.read_text()))
    sys.path.insert(0, str(into))
    return "tpserve_base"


class Side:
    """One revision's engine, driven through whichever request API that revision has."""

    def __init__(self, package: str, name: str, engine_kwargs: dict) -> None:
        setup = importlib.import_module(f"{package}.engine.setup")
        dist = importlib.import_module(f"{package}.distributed")
        self.params_cls = importlib.import_module(f"{package}.engine.sampling_params").SamplingParams
        self.name = name
        self.runner, self.engine = setup.build_runtime(setup.EngineArgs(**engine_kwargs), dist.TPGroup())
        try:
            self.factory = importlib.import_module(f"{package}.server.requests").RequestFactory.for_engine(self.engine)
        except ModuleNotFoundError:
            self.factory = None  # a revision before the request factory: engine.add_request
        self.seconds = 0.0
        self.forward_seconds = 0.0
        self.steps = 0
        self.tokens: dict[str, list[int]] = {}
        execute = self.runner.execute

        def timed_execute(plan):
            t0 = time.perf_counter()
            out = execute(plan)
            self.forward_seconds += time.perf_counter() - t0
            return out

        self.runner.execute = timed_execute

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params_cls(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        if self.factory is not None:
            self.engine.add_sequence(self.factory.make(request_id, prompt_token_ids=prompt, params=params))
        else:
            self.engine.add_request(request_id, prompt_token_ids=prompt, params=params)
        self.tokens[request_id] = []

    def busy(self) -> bool:
        engine = self.engine
        return engine.has_work() if hasattr(engine, "has_work") else engine.has_unfinished_requests()

    def step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        for out in outputs:
            self.tokens[out.request_id] += out.new_token_ids

    def share_weights_of(self, other: Side) -> None:
        """Use the other side's weight tensors (same architecture, same parameter names)."""
        pairs = [(self.runner.model, other.runner.model)]
        mine, theirs = self.engine.spec, other.engine.spec
        if mine is not None and hasattr(mine.proposer, "runner"):
            pairs.append((mine.proposer.runner.model, theirs.proposer.runner.model))
        for model, source in pairs:
            params = dict(source.named_parameters())
            for name, p in model.named_parameters():
                p.data = params[name].data


def run_pair(base: str, workload: list[tuple[list[int], int]], engine_kwargs: dict, base_built_first: bool,
             base_steps_first: bool, warm: list[tuple[list[int], int]]) -> dict:
    order = [(base, "base"), ("tpserve", "head")]
    if not base_built_first:
        order.reverse()
    built = [Side(pkg, name, engine_kwargs) for pkg, name in order]
    built[1].share_weights_of(built[0])
    by_name = {s.name: s for s in built}
    sides = [by_name["base"], by_name["head"]] if base_steps_first else [by_name["head"], by_name["base"]]
    for label, work in (("warm", warm), ("timed", workload)):
        for s in sides:
            s.seconds, s.forward_seconds, s.steps = 0.0, 0.0, 0
            for i, (prompt, n) in enumerate(work):
                s.add(f"{label}-{i}", prompt, n)
        turn = 0
        while any(s.busy() for s in sides):
            for s in (sides if turn % 2 == 0 else sides[::-1]):
                if s.busy():
                    s.step()
            turn += 1
    ids = [f"timed-{i}" for i in range(len(workload))]
    head, base_side = by_name["head"], by_name["base"]
    tokens = sum(len(head.tokens[r]) for r in ids)
    overhead = {s.name: 1000 * (s.seconds - s.forward_seconds) / s.steps for s in sides}
    return {"speed": base_side.seconds / head.seconds, "head_tok_per_s": tokens / head.seconds,
            "head_overhead_ms": overhead["head"], "base_overhead_ms": overhead["base"],
            "base_tok_per_s": tokens / base_side.seconds, "head_steps": head.steps, "base_steps": base_side.steps,
            "same_tokens": all(head.tokens[r] == base_side.tokens[r] for r in ids)}


def workload_of(name: str, model: str, draft: str, tokenizer, seed: int):
    """-> (requests, warm-up requests, engine kwargs)."""
    if name == "offline":
        work = seeded_workload(64, tokenizer.vocab_size, (16, 256), (16, 128), seed)
        return work, work[:2], dict(model=model, dtype="float32", max_num_seqs=64, max_num_batched_tokens=2048)
    method, policy, k, batch = re.fullmatch(r"spec-(none|draft|ngram)-(fixed|adaptive)-k(\d+)-b(\d+)", name).groups()
    from spec_decode import heldout_prompts

    k, batch = int(k), int(batch)
    prompts = heldout_prompts(model, tokenizer, batch, 64, seed)
    kwargs = dict(model=model, dtype="float32", max_num_seqs=batch)
    if method != "none":
        kwargs.update(speculative_method=method, draft_model=draft if method == "draft" else None,
                      num_speculative_tokens=k, spec_policy=policy)
    return [(p, 64) for p in prompts], [(prompts[0], 4)], kwargs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git ref of the base revision")
    p.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/compare_revisions.json")
    args = p.parse_args()

    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR
    from tpserve.tokenizer import load_tokenizer

    model, draft = str(DEFAULT_MODEL_DIR), str(DEFAULT_DRAFT_DIR)
    tokenizer = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        base = extract_base(args.base, Path(tmp))
        rows = []
        for name in args.workloads:
            work, warm, kwargs = workload_of(name, model, draft, tokenizer, args.seed)
            runs = [run_pair(base, work, kwargs, base_built_first=r % 2 == 0, base_steps_first=r % 4 in (0, 3),
                             warm=warm) for r in range(args.repeats)]
            rows.append({"workload": name, "speed": statistics.median(r["speed"] for r in runs),
                         "speed_min": min(r["speed"] for r in runs), "speed_max": max(r["speed"] for r in runs),
                         "head_tok_per_s": statistics.median(r["head_tok_per_s"] for r in runs),
                         "base_tok_per_s": statistics.median(r["base_tok_per_s"] for r in runs),
                         "head_overhead_ms": statistics.median(r["head_overhead_ms"] for r in runs),
                         "base_overhead_ms": statistics.median(r["base_overhead_ms"] for r in runs),
                         "head_steps": runs[0]["head_steps"], "base_steps": runs[0]["base_steps"],
                         "same_tokens": all(r["same_tokens"] for r in runs), "runs": runs})
            print(f"{name}: head/base speed x{rows[-1]['speed']:.3f} (min x{rows[-1]['speed_min']:.3f})", flush=True)
    print()
    print_table(rows, ["workload", "speed", "speed_min", "speed_max", "head_tok_per_s", "base_tok_per_s",
                       "head_overhead_ms", "base_overhead_ms", "head_steps", "base_steps", "same_tokens"])
    write_json(args.output, {"base": args.base, "repeats": args.repeats, "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
