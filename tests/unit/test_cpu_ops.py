"""CPU paths of the dense layers: RMSNorm equals the HF Llama reference bit for bit; the\nweight-stationary small-batch linear equals F.linear to rounding, with and without bias."""

import pytest
import torch

from tpserve.layers.norm import RMSNorm
from tpserve.ops import dispatch


def _hf_rmsnorm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_matches_reference(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(96, 1e-5, dtype)
    norm.weight.data.copy_(torch.randn(96, generator=g).to(dtype))
    x = (torch.randn(rows, 96, generator=g) * 5).to(dtype)
    assert torch.equal(norm(x), _hf_rmsnorm(x, norm.weight, 1e-5))


@pytest.mark.parametrize("rows", [1, 2, 3, dispatch.CPU_WEIGHT_STATIONARY_MAX_ROWS, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_functional_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 64, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g)
    y = dispatch.linear(x, w, b)
    assert y.shape == (rows, 300)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = x[None]  # other ranks of input take F.linear
    torch.testing.assert_close(dispatch.linear(x3, w, b), torch.nn.functional.linear(x3, w, b))
