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
