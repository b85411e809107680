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
    contiguous_rows: bool = True
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
    small_model: str | None = None
    route_policy: str | None = None
    route_small_fraction: float = 0.5
    route_threshold: float | None = None
    route_calibration: str | None = None
    route_quantile: float = 0.1
    route_tail_tokens: int = 64
    route_cascade_tokens: int = 8
    route_window: int = 1000
    route_audit_rate: float = 0.0
    route_min_quality: float | None = None
    route_length_small: str = "short"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory (default: the bundled model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per rank (overrides memory sizing)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per rank")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache")
    g.add_argument("--no-contiguous-rows", dest="contiguous_rows", action="store_false",
                   help="CPU: attend by gathering the paged blocks each layer instead of reading per-sequence "
                        "contiguous K/V rows (the rows take up to twice the KV cache's memory, at least 256 MiB, "
                        "beside it; a step needing more gathers the blocks)")
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
    r = parser.add_argument_group("routing to a small model")
    r.add_argument("--small-model", default=None,
                   help="a smaller model (same vocabulary) that serves whole requests on rank 0 (default with "
                        "--route-policy: the bundled draft, when serving the bundled target)")
    r.add_argument("--route-policy", choices=["random", "length", "confidence", "cascade", "gap"], default=None,
                   help="how `auto` requests choose a model (without it, `auto` means the target)")
    r.add_argument("--route-small-fraction", type=float, default=0.5,
                   help="fraction of `auto` traffic to send to the small model (tracked over recent requests)")
    r.add_argument("--route-threshold", type=float, default=None,
                   help="a fixed score threshold instead of --route-small-fraction")
    r.add_argument("--route-calibration", default=None,
                   help="score quantiles from `python -m tpserve.route calibrate` (the tracker's starting point)")
    r.add_argument("--route-quantile", type=float, default=0.1,
                   help="quantile of token log-probabilities a confidence or cascade score takes")
    r.add_argument("--route-tail-tokens", type=int, default=64, help="prompt tokens the confidence policy scores")
    r.add_argument("--route-cascade-tokens", type=int, default=8,
                   help="tokens the small model generates before the cascade decides")
    r.add_argument("--route-window", type=int, default=1000, help="recent scores the fraction is tracked over")
    r.add_argument("--route-length-small", choices=["short", "long"], default="short",
                   help="which prompts the length policy sends to the small model")
    r.add_argument("--route-audit-rate", type=float, default=0.0,
                   help="fraction of small-served requests the target scores again (the online quality audit)")
    r.add_argument("--route-min-quality", type=float, default=None,
                   help="lower the fraction sent to the small model while the audit's quality (1 - the relative "
                        "gap in bits on prompts) is below this floor")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    from tpserve.bundled import DEFAULT_MODEL_DIR

    return EngineArgs(
        model=str(ns.model or DEFAULT_MODEL_DIR), dtype=ns.dtype, block_size=ns.block_size,
        num_kv_blocks=ns.num_kv_blocks, kv_cache_memory=ns.kv_cache_memory,
        gpu_memory_utilization=ns.gpu_memory_utilization, contiguous_rows=ns.contiguous_rows,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
        enable_prefix_caching=ns.enable_prefix_caching, seed=ns.seed,
        speculative_method=ns.speculative_method or ("draft" if ns.draft_model else "none"),
        draft_model=ns.draft_model, num_speculative_tokens=ns.num_speculative_tokens,
        spec_policy=ns.spec_policy, ngram_max=ns.ngram_max,
        small_model=ns.small_model, route_policy=ns.route_policy, route_small_fraction=ns.route_small_fraction,
        route_threshold=ns.route_threshold, route_calibration=ns.route_calibration, route_quantile=ns.route_quantile,
        route_tail_tokens=ns.route_tail_tokens, route_cascade_tokens=ns.route_cascade_tokens,
        route_window=ns.route_window, route_audit_rate=ns.route_audit_rate, route_min_quality=ns.route_min_quality,
        route_length_small=ns.route_length_small,
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
        gpu_memory_utilization=args.gpu_memory_utilization, contiguous_rows=args.contiguous_rows,
    )
    scheduler_config = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len)
    runner = ModelRunner(model_config, cache_config, tp, args.model,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    if not tp.is_first:
        return runner, None
    engine = LLMEngine(
        Driver(runner), model_config.vocab_size, runner.num_blocks, runner.block_size, scheduler_config,
        tokenizer=load_tokenizer(args.model), eos_token_ids=read_eos_token_ids(args.model, model_config),
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
    )
    small_dir = resolve_small_dir(args)
    if small_dir is not None:
        from tpserve.engine.small_model import SmallModel

        engine.small = SmallModel(small_model_runner(small_dir, args, model_config, runner, max_model_len),
                                  build_router(args), engine.scheduler, engine.vocab_size, engine.tokenizer,
                                  engine.add_sequence)
    engine.spec = build_spec_decoder(args, model_config, runner, engine, max_model_len)
    return runner, engine


def resolve_small_dir(args: EngineArgs) -> str | None:
    """The small model's directory: --small-model, or with a routing policy and the bundled
    target, the bundled draft; None without either."""
    from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR

    if args.small_model:
        return args.small_model
    if args.route_policy is None and not args.route_audit_rate:
        return None
    if Path(args.model).resolve() == Path(DEFAULT_MODEL_DIR).resolve():
        return str(DEFAULT_DRAFT_DIR)
    raise ConfigError("--route-policy needs --small-model DIR (only the bundled target has a default small model)")


def small_model_runner(model_dir: str, args: EngineArgs, model_config: ModelConfig, runner: ModelRunner,
                       max_model_len: int) -> ModelRunner:
    """An unsharded runner on rank 0 whose K/V cache has the target's block count and size, so
    that the target's block tables index it (the draft model's runner is one)."""
    cfg = ModelConfig.from_dir(model_dir, args.dtype if args.dtype != "auto" else model_config.dtype)
    if cfg.vocab_size != model_config.vocab_size:
        raise ConfigError(
            f"model {model_dir} has vocab_size={cfg.vocab_size} but the target has {model_config.vocab_size}; "
            f"it must share the target's vocabulary"
        )
    if cfg.max_position_embeddings < max_model_len:
        raise ConfigError(f"model {model_dir} has max_position_embeddings={cfg.max_position_embeddings}, below the "
                          f"served max_model_len={max_model_len}; pass --max-model-len {cfg.max_position_embeddings}")
    cache = CacheConfig(block_size=runner.block_size, num_blocks=runner.num_blocks,
                        contiguous_rows=args.contiguous_rows)
    return ModelRunner(cfg, cache, TPGroup(device=runner.device), model_dir,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)


def build_router(args: EngineArgs):
    from tpserve.route.router import RouteConfig, Router, load_calibration

    config = RouteConfig(policy=args.route_policy, small_fraction=args.route_small_fraction,
                         threshold=args.route_threshold, aggregate_quantile=args.route_quantile,
                         tail_tokens=args.route_tail_tokens, cascade_tokens=args.route_cascade_tokens,
                         window=args.route_window, audit_rate=args.route_audit_rate,
                         min_quality=args.route_min_quality, length_small=args.route_length_small, seed=args.seed)
    calibration = load_calibration(args.route_calibration) if args.route_calibration else None
    return Router(config, calibration)


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
        # When it is also the small model, the one copy serves both.
        small = engine.small
        if small is not None and Path(resolve_small_dir(args)).resolve() == Path(draft_dir).resolve():
            draft_runner = small.runner
        else:
            draft_runner = small_model_runner(draft_dir, args, model_config, runner, max_model_len)
        proposer = DraftProposer(draft_runner, engine.eos_token_ids, engine.sampler.noise)
    controller = SpecController(args.num_speculative_tokens, adaptive=args.spec_policy == "adaptive",
                                free_proposals=proposer.free_proposals)
    return SpecDecoder(proposer, controller, max_model_len)
