"""Offline batch generation through the engine.

    torchrun --nproc-per-node N launch/generate.py --model DIR --input IN.jsonl --output OUT.jsonl \
        --max-tokens M --temperature 0 --dtype float32

Runs as a single process without torchrun too. Input lines: {"prompt": "text"} or
{"prompt_token_ids": [ints]}, optionally with per-request sampling fields (max_tokens,
temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed,
stop, stop_token_ids, ignore_eos, min_tokens, logprobs). Each result is written as soon as its
request finishes (so in finish order): {"index" (the request's place among the input's non-empty
lines), "prompt_token_ids", "token_ids", "text" (when the model has a tokenizer), "finish_reason",
"num_cached_tokens", "logprobs" (when asked)}; lines are flushed at once and synced every 16.
--resume appends to an existing output, skipping the indices it holds (a line a kill cut short is
dropped first). A bad input line is reported with its line number and the others still run (exit
code 2 at the end); --fail-fast stops before running anything instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tpserve.config import ConfigError
from tpserve.distributed import DistEnv, destroy_distributed, init_distributed
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.setup import add_engine_args, build_runtime, engine_args_from
from tpserve.engine.worker import run_worker
from tpserve.errors import InvalidRequest
from tpserve.generation_io import InputError, ResultWriter, done_indices, read_requests
from tpserve.server.offline import generate_iter
from tpserve.weights import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file of prompts")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-tokens", type=int, default=64, help="default max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature (0: greedy)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--resume", action="store_true", help="keep --output's results and run only the missing indices")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad input line, running nothing")
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
            failed, total = run_batch(engine, args)
        finally:
            engine.shutdown()
        for message in failed:
            print(f"error: {message}", file=sys.stderr)
        if failed:
            print(f"error: {len(failed)} of {total} input lines failed; the others are in {args.output}",
                  file=sys.stderr)
            return 2
        return 0
    finally:
        destroy_distributed()


def run_batch(engine, args) -> tuple[list[str], int]:
    """Run every input line not already in the output, writing each result as it finishes.
    Returns (the failed lines' messages, the number of input lines)."""
    defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    lines = read_requests(args.input, defaults)
    failed = [line.error for line in lines if line.error]
    if failed and args.fail_fast:
        raise InputError(failed[0])
    done = done_indices(args.output) if args.resume else set()
    todo = [line for line in lines if line.error is None and line.index not in done]
    prompts = [line.prompt.get("prompt", line.prompt.get("prompt_token_ids")) for line in todo]
    with ResultWriter(args.output, with_text=engine.tokenizer is not None, append=args.resume) as out:
        for j, result in generate_iter(engine, prompts, [line.params for line in todo], skip_invalid=True):
            line = todo[j]
            if isinstance(result, InvalidRequest):
                message = f"{args.input}:{line.lineno}: {result}"
                if args.fail_fast:  # refusals come before anything runs
                    raise InputError(message)
                failed.append(message)
            else:
                out.write(line.index, result)
    return failed, len(lines)


def cli(argv=None) -> int:
    """main() with user errors (bad flag, checkpoint or input) reported as one line, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except (ConfigError, CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (about 0.4 s once torch is loaded, a fifth of a
    short job's start-up and exit): every result is already written, closed and synced, and
    the process group is destroyed; logs and the standard streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(cli())
