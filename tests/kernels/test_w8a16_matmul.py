"""kernels.w8a16_matmul against tpserve.ops.quant.w8a16_matmul_ref (Triton interpreter)."""

import pytest
import torch

from tpserve.kernels.w8a16_matmul import w8a16_matmul
from tpserve.ops.quant import quantize_int8, w8a16_matmul_ref


def _problem(m, n, k, dtype, scale_dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qweight, scale = quantize_int8(w, scale_dtype=scale_dtype)
    x = torch.randn(m, k, generator=g).to(dtype)  # x @ w^T is O(1) for K ~ 128-256
    b = torch.randn(n, generator=g).to(scale_dtype) if bias else None
    return x, qweight, scale, b


@pytest.mark.parametrize("m", [1, 17, 127, 128, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(m, dtype, assert_close):
    # N=37 straddles the 32-wide N tile; K=256 gives split-K (decode) two tiles per split.
    n, k = (37, 256) if m in (1, 128) else (24, 128)
    x, qweight, scale, bias = _problem(m, n, k, dtype, bias=m != 17)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: an unwritten element fails
    y = w8a16_matmul(x, qweight, scale, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, w8a16_matmul_ref(x, qweight, scale, bias), dtype)


@pytest.mark.parametrize("m,split_k", [(3, 1), (3, 3), (40, 2)])
def test_ragged_k_split_k_and_scale_dtype(m, split_k, assert_close):
    """K=200 is not a multiple of BLOCK_K=64 (masked K tail); scale and bias in fp16; strided x."""
    dtype = torch.float16
    x, qweight, scale, bias = _problem(m, 40, 200, dtype, scale_dtype=dtype, seed=1)
    x = torch.cat([x, x], dim=1)[:, ::2]  # non-contiguous view, same values
    out = torch.full((m, 40), float("nan"), dtype=dtype)
    y = w8a16_matmul(x, qweight, scale, bias, out=out, split_k=split_k)
    assert_close(y, w8a16_matmul_ref(x, qweight, scale, bias), dtype)


def test_quantize_int8_round_trip():
    w = torch.randn(24, 128) * torch.logspace(-3, 1, 24)[:, None]  # very different row ranges
    qweight, scale = quantize_int8(w)
    assert qweight.dtype == torch.int8 and scale.shape == (24,)
    err = (qweight.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert qweight.abs().amax(dim=1).eq(127).all()  # every row uses its full range


def test_errors_name_the_bad_value():
    x, qweight, scale, _ = _problem(4, 24, 128, torch.float32)
    with pytest.raises(ValueError, match=r"qweight must be int8 \[N, 128\]"):
        w8a16_matmul(x, qweight.float(), scale)
    with pytest.raises(ValueError, match=r"scale must be \[24\]"):
        w8a16_matmul(x, qweight, scale[:5])
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        w8a16_matmul(x.int(), qweight, scale)
    with pytest.raises(ValueError, match=r"out must be \[4, 24\]"):
        w8a16_matmul(x, qweight, scale, out=torch.empty(4, 24, dtype=torch.float16))
