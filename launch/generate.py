"""Offline batch generation through the engine.

    torchrun --nproc-per-node N launch/generate.py --model DIR --input IN.jsonl --output OUT.jsonl \
        --max-tokens M --temperature 0 --dtype float32

Runs as a single process without torchrun too. Input lines: {"prompt": "text"} or
{"prompt_token_ids": [ints]}, optionally with per-request sampling fields (max_tokens,
temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed,
stop, stop_token_ids, ignore_eos, min_tokens, logprobs). Output line i: {"index",
"prompt_token_ids", "token_ids", "text" (when the model has a tokenizer), "finish_reason",
"num_cached_tokens", "logprobs" (when asked)}.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tpserve.config import ConfigError
from tpserve.distributed import DistEnv, destroy_distributed, init_distributed
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.setup import add_engine_args, build_runtime, engine_args_from
from tpserve.engine.worker import run_worker
from tpserve.generation_io import InputError, read_requests, write_results
from tpserve.server.offline import generate
from tpserve.weights import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file of prompts")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-tokens", type=int, default=64, help="default max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature (0: greedy)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    add_engine_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    engine_args = engine_args_from(args)
    tp = init_distributed(DistEnv.from_environ(), device_type=args.device)
    try:
        runner, engine = build_runtime(engine_args, tp)
        if engine is None:
            run_worker(runner)
            return 0
        try:
            defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
            requests = read_requests(args.input, defaults)
            prompts = [r[0].get("prompt", r[0].get("prompt_token_ids")) for r in requests]
            results = generate(engine, prompts, [r[1] for r in requests])
        finally:
            engine.shutdown()
        write_results(args.output, results, with_text=engine.tokenizer is not None)
        return 0
    finally:
        destroy_distributed()


def cli(argv=None) -> int:
    """main() with user errors (bad flag, checkpoint or input) reported as one line, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except (ConfigError, CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
