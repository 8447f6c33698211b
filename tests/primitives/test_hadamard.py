"""Hadamard matrices of the orders model widths have."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.primitives.hadamard import hadamard, has_hadamard


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 1536])
def test_orthonormal_with_equal_magnitude_entries(n):
    h = hadamard(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_orders_without_a_construction_are_a_clear_error():
    assert not has_hadamard(6) and not has_hadamard(18)
    with pytest.raises(LowbitError, match="kind: random"):
        hadamard(6)


@pytest.mark.parametrize("n", [1, 64, 96, 576, 1536])
def test_the_online_transform_is_its_dense_orthonormal_matrix(n):
    from lowbit.primitives.hadamard import online_block, online_hadamard, online_matrix

    m = online_matrix(n)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(online_hadamard(x, online_block(n, torch.float64)), x @ m, atol=1e-12)


def test_online_blocks_are_the_smallest_that_fit():
    from lowbit.primitives.hadamard import online_block

    assert [online_block(n).shape[0] for n in (64, 96, 576, 1536)] == [1, 12, 36, 12]
    with pytest.raises(LowbitError, match="online rotation"):
        online_block(6)
