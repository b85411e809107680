"""tpserve.ops.dispatch: the backend switch, and both backends agreeing through it."""

import subprocess
import sys

import pytest
import torch

from tpserve.ops import dispatch
from tpserve.ops.quant import quantize_int4, quantize_int8


def test_backend_switch_and_context_manager():
    assert dispatch.get_backend() == "auto"
    assert not dispatch._use_triton(torch.zeros(1))  # auto: CPU tensors take the reference
    with dispatch.use_backend("torch"):
        assert dispatch.get_backend() == "torch"
        with dispatch.use_backend("triton"):
            assert dispatch._use_triton(torch.zeros(1))
        assert dispatch.get_backend() == "torch"
    assert dispatch.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.set_backend("cuda")


@pytest.mark.parametrize("q_lens", [[1, 1], [6, 1]], ids=["decode", "prefill"])
def test_attention_backends_agree(q_lens, paged_batch, assert_close):
    dtype = torch.float32
    batches = [paged_batch([40, 9], q_lens, 4, 2, 16, block_size=8, dtype=dtype) for _ in range(2)]
    outs = []
    for backend, b in zip(["torch", "triton"], batches):
        with dispatch.use_backend(backend):
            outs.append(dispatch.attention(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.25, 16))
    assert_close(outs[1], outs[0], dtype)
    # Both paths wrote the new K/V (the decode path through write_kv_cache, prefill in-kernel).
    torch.testing.assert_close(batches[1].k_cache, batches[0].k_cache, atol=0, rtol=0, equal_nan=True)


def test_quantised_matmul_backends_agree_on_3d_input(assert_close):
    x = torch.randn(2, 3, 128)
    w = torch.randn(24, 128) * 0.05
    q8, s8 = quantize_int8(w)
    q4, s4, z4 = quantize_int4(w, 64)
    results = {}
    for backend in ("torch", "triton"):
        with dispatch.use_backend(backend):
            results[backend] = (dispatch.w8a16_matmul(x, q8, s8), dispatch.w4a16_matmul(x, q4, s4, z4, 64))
    for got, expected in zip(results["triton"], results["torch"]):
        assert got.shape == (2, 3, 24)
        assert_close(got, expected, torch.float32)


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, as on macOS
        "import torch\n"
        "from tpserve.ops import dispatch\n"
        "from tpserve.ops.quant import quantize_int8\n"
        "q, s = quantize_int8(torch.randn(8, 16))\n"
        "assert dispatch.w8a16_matmul(torch.randn(2, 16), q, s).shape == (2, 8)\n"
        "assert not dispatch.triton_available()\n"
        "try:\n    dispatch.set_backend('triton')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused: backend 'triton' requested but the triton package is not installed" in res.stdout


def test_triton_path_without_importable_kernels_fails_at_start_up(monkeypatch):
    import importlib.util

    from tpserve.errors import ConfigError

    dispatch.require_kernels(torch.device("cpu"))  # the reference path needs no kernels
    with dispatch.use_backend("triton"):
        dispatch.require_kernels(torch.device("cpu"))  # installed: importable
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tpserve.kernels"
                            else real(name, *a))
        with pytest.raises(ConfigError, match="tpserve.kernels cannot be imported.*install tpserve"):
            dispatch.require_kernels(torch.device("cpu"))
