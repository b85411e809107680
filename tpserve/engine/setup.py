"""Engine arguments shared by the launchers, and the construction of a rank's runtime.

`add_engine_args` registers the flags on a parser the launcher owns (only launch/ reads argv);
`build_runtime` turns the parsed values into a ModelRunner on every rank and, on rank 0, an LLMEngine.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tpserve.config import CacheConfig, ConfigError, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.engine.engine import LLMEngine
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.scheduler import SchedulerConfig
from tpserve.engine.worker import Driver
from tpserve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class EngineArgs:
    model: str
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    speculative_method: str = "none"  # none | draft | ngram
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    spec_policy: str = "adaptive"  # adaptive | fixed
    ngram_max: int = 4


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory (default: the bundled model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per rank (overrides memory sizing)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per rank")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    g.add_argument("--max-model-len", type=int, default=None, help="default: the model's max positions")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--seed", type=int, default=0, help="seed of the engine's shared sampling generator")
    s = parser.add_argument_group("speculative decoding")
    s.add_argument("--speculative-method", choices=["none", "draft", "ngram"], default=None,
                   help="default: draft when --draft-model is given, else none")
    s.add_argument("--draft-model", default=None,
                   help="draft model directory (default with --speculative-method draft: the bundled draft, "
                        "when serving the bundled target)")
    s.add_argument("--num-speculative-tokens", type=int, default=4, help="k, or the largest k when adaptive")
    s.add_argument("--spec-policy", choices=["adaptive", "fixed"], default="adaptive",
                   help="adaptive: choose k per step (down to 0) from the throughput measured for each k at this batch size")
    s.add_argument("--ngram-max", type=int, default=4, help="longest n-gram the prompt-lookup proposer matches")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    from tpserve.bundled import DEFAULT_MODEL_DIR

    return EngineArgs(
        model=str(ns.model or DEFAULT_MODEL_DIR), dtype=ns.dtype, block_size=ns.block_size,
        num_kv_blocks=ns.num_kv_blocks, kv_cache_memory=ns.kv_cache_memory,
        gpu_memory_utilization=ns.gpu_memory_utilization, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
        enable_prefix_caching=ns.enable_prefix_caching, seed=ns.seed,
        speculative_method=ns.speculative_method or ("draft" if ns.draft_model else "none"),
        draft_model=ns.draft_model, num_speculative_tokens=ns.num_speculative_tokens,
        spec_policy=ns.spec_policy, ngram_max=ns.ngram_max,
    )


def read_eos_token_ids(model_dir: str | Path, model_config: ModelConfig) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json together."""
    ids = set(model_config.eos_token_ids)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    return tuple(sorted(ids))


def build_runtime(args: EngineArgs, tp: TPGroup) -> tuple[ModelRunner, LLMEngine | None]:
    """Every rank gets its runner; rank 0 also gets the engine that drives all of them."""
    model_config = ModelConfig.from_dir(args.model, args.dtype)
    max_model_len = args.max_model_len or model_config.max_position_embeddings
    if max_model_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    cache_config = CacheConfig(
        block_size=args.block_size, num_blocks=args.num_kv_blocks, cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    scheduler_config = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len)
    runner = ModelRunner(model_config, cache_config, tp, args.model,
                         max_num_batched_tokens=args.max_num_batched_tokens)
    if not tp.is_first:
        return runner, None
    engine = LLMEngine(
        Driver(runner), model_config.vocab_size, runner.num_blocks, runner.block_size, scheduler_config,
        tokenizer=load_tokenizer(args.model), eos_token_ids=read_eos_token_ids(args.model, model_config),
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
    )
    engine.spec = build_spec_decoder(args, model_config, runner, engine, max_model_len)
    return runner, engine


def resolve_draft_dir(args: EngineArgs) -> str:
    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR

    if args.draft_model:
        return args.draft_model
    if Path(args.model).resolve() == Path(DEFAULT_MODEL_DIR).resolve():
        return str(DEFAULT_DRAFT_DIR)
    raise ConfigError("--speculative-method draft needs --draft-model DIR (only the bundled target has a default draft)")


def build_spec_decoder(args: EngineArgs, model_config: ModelConfig, runner: ModelRunner, engine: LLMEngine,
                       max_model_len: int):
    """The proposer and k controller on rank 0, or None when speculation is off."""
    from tpserve.engine.spec_decode.controller import SpecController
    from tpserve.engine.spec_decode.decoder import SpecDecoder
    from tpserve.engine.spec_decode.proposers import DraftProposer, NgramProposer

    if args.speculative_method == "none":
        return None
    if not 1 <= args.num_speculative_tokens <= 16:
        raise ConfigError(f"num_speculative_tokens={args.num_speculative_tokens} must be in [1, 16]")
    if args.speculative_method == "ngram":
        proposer = NgramProposer(max_ngram=args.ngram_max)
    else:
        draft_dir = resolve_draft_dir(args)
        draft_config = ModelConfig.from_dir(draft_dir, args.dtype if args.dtype != "auto" else model_config.dtype)
        if draft_config.vocab_size != model_config.vocab_size:
            raise ConfigError(
                f"draft model {draft_dir} has vocab_size={draft_config.vocab_size} but the target has "
                f"{model_config.vocab_size}; the draft must share the target's vocabulary"
            )
        # The draft is not sharded: it lives on rank 0 only and shares the target's block tables.
        draft_cache = CacheConfig(block_size=runner.block_size, num_blocks=runner.num_blocks)
        draft_runner = ModelRunner(draft_config, draft_cache, TPGroup(device=runner.device), draft_dir,
                                   max_num_batched_tokens=args.max_num_batched_tokens)
        proposer = DraftProposer(draft_runner, engine.eos_token_ids, engine.sampler.generator_for)
    controller = SpecController(args.num_speculative_tokens, adaptive=args.spec_policy == "adaptive",
                                free_proposals=proposer.free_proposals)
    return SpecDecoder(proposer, controller, max_model_len)
