"""Block-size heuristics shared by the weight-only quantised GEMMs (no Triton import here).

A fixed table instead of `triton.autotune`: autotuning benchmarks on first call, which the
interpreter cannot do meaningfully and which would make the first decode step of a server slow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_gemm_config(m: int, n: int, k: int, device: torch.device, max_block_k: int | None = None) -> GemmConfig:
    """Decode shapes (m <= 16) are weight-bandwidth bound: a 16-row tile (the smallest tl.dot
    takes), narrow N tiles and split-K so even one output row keeps every SM streaming weights.
    Prefill shapes are compute bound: large tiles, no split. max_block_k caps BLOCK_K (the int4
    kernel needs BLOCK_K to divide the quantisation group)."""
    cap = max_block_k or 256
    if device.type != "cuda":
        # Interpreter: small tiles keep the per-program numpy work cheap.
        bm = 16 if m <= 16 else 64
        bk = min(64, cap)
        return GemmConfig(bm, 32, bk, split_k=2 if m <= 16 and k >= 2 * bk else 1, num_warps=4, num_stages=1)
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, min(128, cap), 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, min(64, cap), 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, min(64, cap), 8, 3
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    # Double the split while the grid is under ~2 waves and each split keeps >= 4 K-iterations.
    while tiles * split < 2 * sms and k // (bk * split * 2) >= 4:
        split *= 2
    return GemmConfig(bm, bn, bk, split, num_warps=warps, num_stages=stages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
