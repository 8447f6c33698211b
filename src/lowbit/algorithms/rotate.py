"""Rotations (QuaRot, SpinQuant): an orthogonal change of basis folded into the weights.

A decoder's residual stream x can be replaced by x·Q for any orthogonal Q without changing
what the model computes, once the RMSNorm scales are folded into the linears that read the
norms (an RMSNorm without a scale commutes with Q: ‖xQ‖ = ‖x‖). Each linear reading the
stream gets W·Q, each one writing to it Qᵀ·W, the embedding E·Q. A Hadamard Q spreads the
few huge channels of the stream over all of them, so weights and activations round with
less error. Inside attention, each head's values can be turned by a Hadamard H of the head
size (v_proj rows Hᵀ·W, o_proj columns W·H). A LayerNorm also subtracts the mean: it
commutes with a Q that keeps the mean direction (:func:`keep_mean`). Pure tensor functions;
the wiring is :mod:`lowbit.models.rotate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.primitives.hadamard import hadamard, has_hadamard, online_matrix

ONLINE = ("down_proj",)  # the inputs an online rotation can turn
KINDS = ("hadamard", "random", "learned")
SEED_LIMIT = 2**40


@dataclass(frozen=True)
class RotateOptions:
    """``kind``: ``hadamard`` (a Hadamard matrix with random column signs, QuaRot),
    ``random`` (a random orthogonal matrix, any width) or ``learned`` (SpinQuant: the
    residual stream's matrix trained on the calibration text by :func:`cayley_step`, starting
    from the Hadamard one, or a random one where no Hadamard matrix fits; ``steps`` windows,
    step size ``lr`` decaying linearly to 0; with ``heads`` and ``learn_heads``, each block's
    head matrix is trained with it, SpinQuant's R2; by default they stay the Hadamard one,
    which measured the lower perplexity on the default model);
    ``heads``: also turn each attention head's values and the matching o_proj columns;
    ``seed`` picks the signs / the matrix.
    ``online: [down_proj]`` also turns every MLP's ``down_proj`` input by a Hadamard matrix at
    run time (a fast transform, :func:`lowbit.primitives.hadamard.online_hadamard`; its
    transpose is folded into the weight): the product gate·up has outliers no offline
    rotation reaches (QuaRot's online half; the keys' and queries' half is the attention
    block's ``hadamard``).
    ``if_possible`` (the ``*-best`` presets): a model that cannot take the rotation, or only
    without its online part, is quantized without what it cannot take, with a warning (the
    folder's recipe records what was applied); otherwise such a model is an error."""

    kind: Literal["hadamard", "random", "learned"] = "hadamard"
    heads: bool = True
    seed: int = 0
    online: tuple[str, ...] = ()
    steps: int = 100
    lr: float = 1.5
    learn_heads: bool = False
    if_possible: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LowbitError(f"rotate.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not -SEED_LIMIT < self.seed < SEED_LIMIT:  # seed·1,000,003 + n seeds torch: int64
            raise LowbitError(f"rotate.seed must be an integer between -2**40 and 2**40, got "
                              f"{self.seed}")  # fmt: skip
        if self.steps < 1 or not self.lr > 0:
            raise LowbitError(f"rotate: steps must be >= 1 and lr > 0 (got steps {self.steps}, "
                              f"lr {self.lr})")  # fmt: skip
        if self.learn_heads and (self.kind != "learned" or not self.heads):
            raise LowbitError("rotate.learn_heads trains the head matrices: it needs kind: "
                              "learned and heads: true")  # fmt: skip
        unknown = [x for x in self.online if x not in ONLINE]
        if unknown:
            raise LowbitError(f"rotate.online: {unknown[0]!r} is not one of "
                              f"{', '.join(ONLINE)} (queries and keys: the attention block's "
                              f"hadamard: true)")  # fmt: skip


def orthogonal(n: int, options: RotateOptions, fast: bool = False) -> Tensor:
    """An (n, n) float64 orthogonal matrix of the kind ``options`` asks for; ``fast``: the
    Hadamard matrix that the online transform computes (:func:`online_matrix`, with the same
    column signs), for a stream that is also turned at run time (kind hadamard only)."""
    if options.kind == "random" or (options.kind == "learned" and not has_hadamard(n)):
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + n)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed
    h = online_matrix(n) if fast else hadamard(n, torch.float64)
    return h * stream_signs(n, options).unsqueeze(0)


def stream_signs(n: int, options: RotateOptions) -> Tensor:
    """The seeded ±1 column signs of :func:`orthogonal`'s Hadamard matrices (float64)."""
    g = torch.Generator().manual_seed(options.seed * 1_000_003 + n)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def keep_mean(q: Tensor) -> Tensor:
    """``q`` times the reflection that maps the mean direction u = 1/√n (after ``q``) back to
    u, so that u·Q = u: then Q also keeps the subspace of zero-mean vectors, and a LayerNorm
    without its scale and bias commutes with it (its mean and its norm of x·Q are x's).
    For a Hadamard q the reflection swaps ±e1 and u: Q still spreads every channel over
    many, though no longer evenly (largest |Q_ij|·√n about 3–4 at n = 64–1024, against 1)."""
    n = q.shape[0]
    u = torch.full((n,), n**-0.5, dtype=q.dtype)
    v = u @ q - u
    if v.norm() < 1e-12:
        return q
    v = v / v.norm()
    return q - 2 * (q @ v)[:, None] * v[None]  # q · (I − 2 v vᵀ)


def reads(weight: Tensor, q: Tensor, scale: Tensor | None = None) -> Tensor:
    """A linear that reads the rotated stream: (W·diag(scale))·Q (scale: a folded norm),
    computed in ``q``'s dtype (float64 when folding; float32 while learning)."""
    w = weight.to(q.dtype) if scale is None else weight.to(q.dtype) * scale.to(q.dtype)[None]
    return (w @ q).to(weight.dtype)


def writes(weight: Tensor, q: Tensor) -> Tensor:
    """A linear (or a bias, 1-D) that writes to the rotated stream: Qᵀ·W."""
    return (q.T @ weight.to(q.dtype)).to(weight.dtype)


def cayley_step(q: Tensor, grad: Tensor, lr: float) -> Tensor:
    """One descent step of an orthogonal ``q`` along the loss gradient ``grad`` that stays
    exactly orthogonal: Cayley SGD on the Stiefel manifold (Li, Li & Todorovic 2020, the
    optimiser SpinQuant uses). With the skew-symmetric W = G·Qᵀ − Q·Gᵀ the step is
    Q' = (I + a/2·W)⁻¹ (I − a/2·W) Q, whose first-order change −W·Q lowers the loss by
    ½‖W‖²·a; a = min(lr, 1/‖W‖) keeps one step from turning the basis by more than about a
    radian. Computed in float64."""
    q64, g64 = q.double(), grad.double()
    a = g64 @ q64.T
    w = a - a.T
    step = min(lr, 1.0 / max(float(w.norm()), 1e-12))
    eye = torch.eye(q.shape[0], dtype=torch.float64, device=q.device)
    return torch.linalg.solve(eye + step / 2 * w, (eye - step / 2 * w) @ q64).to(q.dtype)


def head_rows(weight: Tensor, h: Tensor) -> Tensor:
    """v_proj's output (weight rows or bias) per head of size len(h): Hᵀ·W_head."""
    d = h.shape[0]
    w = weight.to(h.dtype).reshape(-1, d, *weight.shape[1:])  # (heads, d, ...)
    return torch.einsum("dj,hd...->hj...", h, w).reshape(weight.shape).to(weight.dtype)


def head_columns(weight: Tensor, h: Tensor) -> Tensor:
    """o_proj's input columns per head of size len(h): W_head·H."""
    d = h.shape[0]
    w = weight.to(h.dtype).reshape(weight.shape[0], -1, d)  # (out, heads, d)
    return torch.einsum("ohd,dj->ohj", w, h).reshape(weight.shape).to(weight.dtype)
