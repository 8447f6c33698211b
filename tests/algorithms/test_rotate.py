"""Cayley steps on the Stiefel manifold: exactly orthogonal, and descending."""

import itertools

import pytest
import torch

from lowbit.algorithms.rotate import RotateOptions, cayley_step, orthogonal
from lowbit.errors import LowbitError


def test_cayley_steps_stay_orthogonal_and_descend():
    """Minimise ||Q - T||^2 over orthogonal Q for an orthogonal target T: every step keeps
    Q orthogonal to float64 precision and lowers the distance (a wrong sign or a wrong
    projection would raise it). The target is reachable: a turn of the start (a Cayley step
    never leaves the start's component, det = +1 or -1)."""
    n = 16
    q = orthogonal(n, RotateOptions(kind="random", seed=4))
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.linalg.matrix_exp(a - a.T) @ q
    distances = []
    for _ in range(30):
        distances.append(float((q - target).norm() ** 2))
        q = cayley_step(q, 2 * (q - target), lr=0.2)
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert all(b < a for a, b in itertools.pairwise(distances))
    assert distances[-1] < 0.05 * distances[0]


def test_a_learned_rotation_starts_from_the_hadamard_one():
    learned = orthogonal(16, RotateOptions(kind="learned", seed=2))
    assert torch.equal(learned, orthogonal(16, RotateOptions(kind="hadamard", seed=2)))
    odd = orthogonal(12 * 5, RotateOptions(kind="learned"))  # no Hadamard of 60: a random one
    assert torch.allclose(odd @ odd.T, torch.eye(60, dtype=torch.float64), atol=1e-12)


def test_bad_learning_options_are_refused():
    with pytest.raises(LowbitError, match="steps"):
        RotateOptions(kind="learned", steps=0)
    with pytest.raises(LowbitError, match="kind"):
        RotateOptions(kind="spin")
    with pytest.raises(LowbitError, match="rotate.seed must be"):  # torch takes 64-bit seeds
        RotateOptions(seed=2**62)
    from lowbit.algorithms.rotate import orthogonal

    assert orthogonal(8, RotateOptions(kind="random", seed=-(2**39))).shape == (8, 8)
