"""The native online Hadamard transform equals its plain-PyTorch reference."""

import pytest
import torch

from lowbit.kernels.build import native_ops
from lowbit.kernels.hadamard import hadamard_transform
from lowbit.primitives.hadamard import online_block, online_hadamard, online_matrix


@pytest.mark.parametrize("n", [1, 64, 96, 576, 1536])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_the_transform_equals_its_reference(n, rows):
    if not native_ops():
        pytest.skip("lowbit's CPU kernels are not built here (the reference runs instead)")
    block = online_block(n)
    x = torch.randn(rows, 2, n, generator=torch.Generator().manual_seed(rows))
    got = hadamard_transform(x, block)
    assert got.shape == x.shape
    expected = (x.double() @ online_matrix(n)).float()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(online_hadamard(x, block), expected, atol=1e-5, rtol=1e-5)


def test_bad_blocks_are_refused():
    if not native_ops():
        pytest.skip("lowbit's CPU kernels are not built here")
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.lowbit_cpu.hadamard_transform(torch.zeros(2, 36), torch.eye(3))


def test_gradients_pass_through_the_transform():
    """A learned rotation back-propagates through down_proj's online transform: the native op
    has no backward, so a tensor that asks for a gradient takes the reference (H is
    orthonormal and symmetric per block: the gradient is the transform of the upstream one)."""
    n = 96
    block = online_block(n)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0), requires_grad=True)
    up = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    (hadamard_transform(x, block) * up).sum().backward()
    expected = (up.double() @ online_matrix(n).T).float()
    assert torch.allclose(x.grad, expected, atol=1e-5, rtol=1e-5)
