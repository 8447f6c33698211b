"""The Fréchet distance against its closed form on Gaussians."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.frechet import frechet_distance


def test_the_distance_is_zero_for_one_set_and_the_mean_shift_for_a_moved_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([3.0, 0, 0, -1.0, 0, 2.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_scaled_gaussians_match_the_closed_form():
    # N(0, I) vs N(0, s^2 I) in d dimensions: d (1 - s)^2, up to sampling error
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20000, 4, generator=g), 3.0 * torch.randn(20000, 4, generator=g)
    assert frechet_distance(a, b) == pytest.approx(4 * (1 - 3.0) ** 2, rel=0.05)
    few = torch.randn(5, 32, generator=g)  # fewer samples than dimensions: still finite
    assert frechet_distance(few, few + 1) == pytest.approx(32.0, rel=1e-3)
    with pytest.raises(LowbitError, match="feature sets"):
        frechet_distance(a, torch.randn(10, 3))
