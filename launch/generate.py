"""Offline batch generation.

    torchrun --nproc-per-node N launch/generate.py --model DIR --input IN.jsonl --output OUT.jsonl \
        --max-tokens M --temperature 0 --dtype float32

Runs as a single process without torchrun too. Input lines: {"prompt": "text"} or
{"prompt_token_ids": [ints]}; output line i: {"index", "prompt_token_ids", "token_ids", "text"
(when the model has a tokenizer), "finish_reason"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpserve.config import CacheConfig, ConfigError, ModelConfig  # noqa: E402
from tpserve.distributed import DistEnv, destroy_distributed, init_distributed  # noqa: E402
from tpserve.engine.model_runner import ModelRunner  # noqa: E402
from tpserve.engine.offline import GenerationRequest, OfflineGenerator  # noqa: E402
from tpserve.engine.worker import Driver, run_worker  # noqa: E402
from tpserve.tokenizer import load_tokenizer  # noqa: E402
from tpserve.generation_io import InputError, read_requests, write_results  # noqa: E402
from tpserve.weights import CheckpointError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled model)")
    p.add_argument("--input", required=True, help="JSONL file of prompts")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per rank")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    return p.parse_args(argv)


def default_model_dir() -> Path:
    from tpserve.bundled import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model) if args.model else default_model_dir()
    model_config = ModelConfig.from_dir(model_dir, args.dtype)
    cache_config = CacheConfig(
        block_size=args.block_size, num_blocks=args.num_kv_blocks, cache_memory_bytes=args.kv_cache_memory
    )
    tp = init_distributed(DistEnv.from_environ(), device_type=args.device)
    try:
        runner = ModelRunner(model_config, cache_config, tp, model_dir)
        if not tp.is_first:
            run_worker(runner)
            return 0
        driver = Driver(runner)
        try:
            tokenizer = load_tokenizer(model_dir)
            prompts = read_requests(args.input, tokenizer, model_config.vocab_size)
            requests = [
                GenerationRequest(ids, args.max_tokens, args.temperature, args.seed) for ids in prompts
            ]
            results = OfflineGenerator(driver, model_config.eos_token_ids).generate(requests)
        finally:
            driver.shutdown()
        write_results(args.output, results, tokenizer)
        return 0
    finally:
        destroy_distributed()


def cli(argv=None) -> int:
    """main() with user errors (bad flag, checkpoint or input) reported as one line, exit code 2."""
    try:
        return main(argv)
    except (ConfigError, CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
