"""Orthonormal Hadamard matrices of the orders model widths have (64, 576 = 12·12·4, 1536 =
12·128, ...): Sylvester's doubling (``scipy.linalg.hadamard``) times, when the order is not a
power of two, one Paley block.

Why by hand: scipy builds powers of two only, and no maintained library builds the Paley
orders (q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for q ≡ 1 mod 4) that QuaRot-style rotations
need for widths such as 576 or 1536; the constructions are a few lines of number theory.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.linalg import hadamard as sylvester
from torch import Tensor

from lowbit.errors import LowbitError


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """An (n, n) Hadamard matrix scaled by 1/√n (orthonormal: H Hᵀ = I)."""
    h = _hadamard(n)
    if h is None:
        raise LowbitError(f"no Hadamard matrix of order {n} can be built here (orders are a "
                          f"power of two times 1, or q + 1 or 2(q + 1) for a prime q); use "
                          f"kind: random")  # fmt: skip
    return torch.from_numpy(h / np.sqrt(n)).to(dtype)


def has_hadamard(n: int) -> bool:
    return _hadamard(n) is not None


def online_block(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The smallest orthonormal Hadamard block A (p, p) with n = p·2^k (p = 1 for a power of
    two): :func:`online_hadamard` turns a width-n input by kron(A, S), S Sylvester's of order
    2^k, which costs n·(k + p) operations per row instead of n² (QuaRot's online transform)."""
    for p in range(1, n + 1):
        m = n // p
        if n % p == 0 and m & (m - 1) == 0 and _hadamard(p) is not None:
            return torch.from_numpy(_hadamard(p) / np.sqrt(p)).to(dtype)
    raise LowbitError(f"no Hadamard matrix of order {n} can be built here; an online rotation "
                      f"needs a width of p·2^k with a Paley order p")  # fmt: skip


def online_matrix(n: int) -> Tensor:
    """The dense float64 (n, n) matrix :func:`online_hadamard` multiplies by (to fold its
    transpose into the weight that reads the turned input)."""
    block = online_block(n, torch.float64)
    m = n // block.shape[0]
    return torch.kron(block, torch.from_numpy(sylvester(m) / np.sqrt(m)))


def online_hadamard(x: Tensor, block: Tensor) -> Tensor:
    """x (..., n) times :func:`online_matrix` (n), fast: Sylvester's part by the butterflies
    of the fast Walsh–Hadamard transform along the last 2^k channels, then the small block."""
    n, p = x.shape[-1], block.shape[0]
    m = n // p
    y = x.reshape(-1, p, m)
    rows = y.shape[0]
    h = 1
    while h < m:  # [a | b] -> [a + b | a - b] on halves of every 2h-channel slice
        pairs = y.reshape(rows, p, m // (2 * h), 2, h)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]),
                        dim=-2)  # fmt: skip
        h *= 2
    y = y.reshape(rows, p, m) * (1.0 / m**0.5)
    if p > 1:
        y = torch.matmul(block.to(y.dtype).T, y)  # Aᵀ·X, X (p, m) per row
    return y.reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _hadamard(n: int) -> np.ndarray | None:
    """±1 entries (float64), or None when this module knows no construction."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return sylvester(n).astype(np.float64)
    for order, build in _paley_orders(n):
        rest = _hadamard(n // order)
        if rest is not None:
            return np.kron(build(), rest)
    return None


def _paley_orders(n: int):
    """(order, builder) of the Paley matrices whose order divides ``n``, largest first."""
    out = []
    for q in range(3, n):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and n % (q + 1) == 0:
            out.append((q + 1, functools.partial(_paley1, q)))
        if q % 4 == 1 and n % (2 * (q + 1)) == 0:
            out.append((2 * (q + 1), functools.partial(_paley2, q)))
    return sorted(out, key=lambda item: -item[0])


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i), χ the quadratic character mod q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.float64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 (q ≡ 3 mod 4): I + S, S skew-symmetric."""
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return np.eye(q + 1) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) (q ≡ 1 mod 4), from the symmetric conference matrix."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a, b = np.array([[1.0, 1.0], [1.0, -1.0]]), np.array([[1.0, -1.0], [-1.0, -1.0]])
    return np.kron(c, a) + np.kron(np.eye(q + 1), b)
