"""The native float-weight op against its plain-PyTorch reference."""

import pytest
import torch

from lowbit.kernels import float_linear as fl
from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 33, 70])  # decode rows, tails, the GEMM path
@pytest.mark.parametrize("n,k", [(1, 16), (13, 100), (40, 576), (7, 9)])  # k not a multiple of 16
def test_native_matches_reference(dtype, m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g)
    ref = fl.float_linear_reference(x, w)
    got = torch.ops.lowbit_cpu.float_linear(x, w)
    # float32 sums of the same exact products, in another order
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_native
def test_leading_dims_and_noncontiguous_input():
    w = torch.randn(24, 64).half()
    x = torch.randn(2, 64, 3).transpose(1, 2)  # (2, 3, 64), not contiguous
    assert torch.allclose(fl.float_linear(x, w), fl.float_linear_reference(x, w), atol=1e-4)


@needs_native
def test_rejects_other_weight_types():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.lowbit_cpu.float_linear(torch.randn(1, 8), torch.randn(4, 8).double())
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lowbit_cpu.float_linear(torch.randn(1, 8), torch.randn(8, 4).t())


def test_fallback_without_native_ops_uses_the_reference(monkeypatch):
    monkeypatch.setattr(fl, "native_ops", lambda: False)
    w, x = torch.randn(8, 32).bfloat16(), torch.randn(3, 32)
    assert torch.equal(fl.float_linear(x, w), fl.float_linear_reference(x, w))
