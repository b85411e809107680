"""kernels.w4a16_matmul against tpserve.ops.quant.w4a16_matmul_ref, and the int4 layout itself."""

import pytest
import torch

from tpserve.kernels.w4a16_matmul import w4a16_matmul
from tpserve.ops.quant import dequantize_int4, pack_int4, quantize_int4, unpack_int4, w4a16_matmul_ref


def _problem(m, n, k, group, dtype, symmetric=False, scale_dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qweight, scales, zeros = quantize_int4(w, group, symmetric=symmetric, scale_dtype=scale_dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(scale_dtype) if bias else None
    return x, qweight, scales, zeros, b


# Pruned grid: every M meets every dtype once and every group size at least twice.
CASES = [
    (1, torch.float32, 32), (1, torch.float16, 128),
    (17, torch.float32, 64), (17, torch.float16, 32),
    (127, torch.float32, 128), (127, torch.float16, 64),
    (128, torch.float32, 32), (128, torch.float16, 128),
    (129, torch.float32, 64), (129, torch.float16, 32),
]


@pytest.mark.parametrize("m,dtype,group", CASES)
def test_matches_reference(m, dtype, group, assert_close):
    # Odd N straddles the 32-wide N tile; K=256 gives the decode path two K tiles per split.
    n, k = (37, 256) if m in (1, 17, 129) else (24, 128)
    x, qweight, scales, zeros, bias = _problem(m, n, k, group, dtype, symmetric=m == 127, bias=m != 17)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, group, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, w4a16_matmul_ref(x, qweight, scales, zeros, group, bias), dtype)


@pytest.mark.parametrize("m,split_k,block_k", [(2, 4, 32), (20, 2, 16)])
def test_split_k_small_block_k_fp16_scales(m, split_k, block_k, assert_close):
    dtype = torch.float16
    x, qweight, scales, zeros, bias = _problem(m, 40, 256, 64, dtype, scale_dtype=dtype, seed=2)
    out = torch.full((m, 40), float("nan"), dtype=dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, 64, bias, out=out, split_k=split_k, block_k=block_k)
    assert_close(y, w4a16_matmul_ref(x, qweight, scales, zeros, 64, bias), dtype)


def test_layout_is_k_major_low_nibble_first():
    q = torch.randint(0, 16, (5, 16))
    packed = pack_int4(q)
    assert packed.shape == (2, 5) and packed.dtype == torch.int32
    for i in range(2):
        for j in range(8):
            assert torch.equal((packed[i].long() >> (4 * j)) & 0xF, q[:, 8 * i + j])
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed < 0, q[:, 7::8].t() >= 8)  # nibble 7 owns the sign bit


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_round_trip(group, symmetric):
    g = torch.Generator().manual_seed(group)
    w = torch.randn(24, 256, generator=g) * torch.logspace(-3, 1, 24)[:, None]
    w[0, :group] = 0.5  # a constant group
    w[1, :group] = 0.0  # an all-zero group
    qweight, scales, zeros = quantize_int4(w, group, symmetric=symmetric)
    assert qweight.shape == (256 // 8, 24) and scales.shape == zeros.shape == (256 // group, 24)
    assert zeros.dtype == torch.uint8 and int(zeros.max()) <= 15
    err = (dequantize_int4(qweight, scales, zeros, group) - w).abs()
    bound = scales.t().repeat_interleave(group, dim=1) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()
    assert err[0, :group].max() <= 1e-6 and err[1, :group].max() == 0


def test_errors_name_the_bad_value():
    x, qweight, scales, zeros, _ = _problem(4, 24, 128, 64, torch.float32)
    with pytest.raises(ValueError, match=r"group_size=48"):
        w4a16_matmul(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[16, N\]"):
        w4a16_matmul(x, qweight.t().contiguous(), scales, zeros, 64)
    with pytest.raises(ValueError, match=r"zeros must be uint8 \[2, 24\]"):
        w4a16_matmul(x, qweight, scales, zeros.float(), 64)
    with pytest.raises(ValueError, match=r"block_k=128 must be >= 16 and divide group_size=64"):
        w4a16_matmul(x, qweight, scales, zeros, 64, block_k=128)
