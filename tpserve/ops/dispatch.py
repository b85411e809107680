"""Backend dispatch: Triton kernels for CUDA tensors, the torch references everywhere else.

The backend is one process-wide switch: "auto" (default: Triton when the tensors are on CUDA and
Triton imports, torch otherwise), "triton" (always the kernels; on CPU tensors this only works
under TRITON_INTERPRET=1) or "torch" (always the references, e.g. to compare or benchmark).
`tpserve.kernels.*` (and so `triton`) is imported only when a call actually takes the Triton path, so
this module imports on machines without Triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tpserve.errors import ConfigError
from tpserve.ops.attention import AttentionMetadata, paged_attention_ref, write_kv_cache
from tpserve.ops.kv_rows import rows_attention, write_rows
from tpserve.ops.quant import w4a16_matmul_ref, w8a16_matmul_ref

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
_triton_available: bool | None = None


def set_backend(name: str) -> None:
    """Choose the backend for every later call: "auto", "triton" or "torch"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but the triton package is not installed")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily switch backend: `with use_backend("torch"): ...`."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    global _triton_available
    if _triton_available is None:
        _triton_available = importlib.util.find_spec("triton") is not None
    return _triton_available


def require_kernels(device: torch.device) -> None:
    """Fail at start-up, saying what to do, when computing on `device` will take the Triton path
    but tpserve.kernels cannot be imported (a partial copy of the package), rather than at the
    first forward."""
    uses_triton = _backend == "triton" or (_backend == "auto" and device.type == "cuda" and triton_available())
    if uses_triton and importlib.util.find_spec("tpserve.kernels") is None:
        raise ConfigError("tpserve.kernels cannot be imported, but the Triton kernels are needed on "
                          f"device {device}; install tpserve (scripts/install.sh, or pip install -e .) "
                          "rather than putting the repository on PYTHONPATH")


def uses_triton(device: torch.device) -> bool:
    """Whether attention and matmuls on `device` take the Triton path under the current backend."""
    return _backend == "triton" or (_backend == "auto" and device.type == "cuda" and triton_available())


def _use_triton(x: torch.Tensor) -> bool:
    if _backend == "auto":
        return x.is_cuda and triton_available()
    return _backend == "triton"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write the new k, v [T, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at
    meta.slot_mapping, then attend q [T, Hq, D] over each sequence's context -> [T, Hq, D].
    With `rows` (the layer's contiguous K/V rows, CPU) and meta.rows, the new K/V also go into the
    rows and attention reads them instead of gathering blocks."""
    if rows is not None and meta.rows is not None:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        write_rows(k, v, *rows, meta.rows)
        return rows_attention(q, *rows, meta.rows, scale, sliding_window)
    if not _use_triton(q):
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window)
    if meta.max_query_len == 1 and q.shape[0] == meta.num_seqs:
        from tpserve.kernels.paged_decode import paged_decode_attention

        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      sliding_window, max_seq_len=meta.max_seq_len)
    from tpserve.kernels.flash_prefill import flash_prefill

    return flash_prefill(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, meta.max_query_len, scale, sliding_window)


# On CPU, a GEMM with 2..CPU_WEIGHT_STATIONARY_MAX_ROWS rows of x (speculative verification at
# small batch) runs about 1.5x faster as w @ x^T than as x @ w^T: the BLAS then packs the few
# columns of x^T instead of the whole weight on every call. One row is a GEMV either way.
CPU_WEIGHT_STATIONARY_MAX_ROWS = 6


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T + bias [N] -> [..., N] (float weights)."""
    if x.is_cuda or x.dim() != 2 or not 2 <= x.shape[0] <= CPU_WEIGHT_STATIONARY_MAX_ROWS:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.t()).t()
    return y if bias is None else y + bias


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def w8a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ (qweight int8 [N, K] * scale [N])^T + bias [N] -> [..., N] in x.dtype."""
    x2 = _flatten(x)
    if _use_triton(x):
        from tpserve.kernels.w8a16_matmul import w8a16_matmul as kernel

        y = kernel(x2, qweight, scale, bias)
    else:
        y = w8a16_matmul_ref(x2, qweight, scale, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequantize_int4(qweight [K//8, N], scales, zeros [K//G, N])^T + bias
    -> [..., N] in x.dtype (layout: tpserve.ops.quant)."""
    x2 = _flatten(x)
    if _use_triton(x):
        from tpserve.kernels.w4a16_matmul import w4a16_matmul as kernel

        y = kernel(x2, qweight, scales, zeros, group_size, bias)
    else:
        y = w4a16_matmul_ref(x2, qweight, scales, zeros, group_size, bias)
    return y.view(*x.shape[:-1], y.shape[-1])
