"""A decoded token's experts through one native call per projection.

A mixture-of-experts block runs, for one token, its top-k experts' ``gate_proj``, ``up_proj``
and ``down_proj``; with 4-bit kernel layers each is a ~1 MB GEMV, and called one by one from
Python the calls' overhead was a third of their time (OLMoE's shape). :func:`one_token_experts`
runs the token's gate and up projections in one :func:`lowbit.kernels.affine.affine_experts`
call and their down projections, with the router's weights, in another; the result equals
the one-by-one loop's to the bit. A ``down_proj``'s input hooks (an online rotation) run on
its expert's row first, as calling the layer runs them. Experts it cannot take (other
formats, biases, shared-input layers, other hooks, unequal shapes) return None, and the
caller keeps its loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from lowbit.kernels.affine import AffineWeight, affine_experts, experts_fit
from lowbit.kernels.build import native_ops
from lowbit.nn.kernel_linear import AffineKernelLinear


def one_token_experts(experts: Sequence[nn.Module], x: Tensor, route: Tensor) -> Tensor | None:
    """``sum_e route[e] · down_e(act(gate_e(x)) · up_e(x))`` over ``experts`` (modules that
    compute exactly that from ``gate_proj``, ``up_proj``, ``down_proj`` and one shared
    ``act_fn``: the caller vouches for their forward), added in their order, for x
    (1, hidden) float32 on the CPU; None where the native call does not apply."""
    one_row = x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu"
    if not (experts and one_row and x.dtype == route.dtype == torch.float32 and native_ops()):
        return None
    act = experts[0].act_fn
    if any(e.act_fn is not act or _hooked(e, pre=True) for e in experts) or global_hooks():
        return None
    up = [affine_only(e.gate_proj) for e in experts] + [affine_only(e.up_proj) for e in experts]
    down = [affine_only(e.down_proj, False) for e in experts]
    if None in up or None in down or not experts_fit(up, x.shape[-1]):
        return None
    if not experts_fit(down, up[0].w.shape[0]):
        return None
    gate_up = affine_experts(x, up)  # (2E, width): the gates, then the ups
    # (elementwise on (E, width), a multiple of 32 wide: the bits of one row at a time)
    h = act(gate_up[: len(experts)]) * gate_up[len(experts) :]
    if any(e.down_proj._forward_pre_hooks for e in experts):
        rows = [_pre_hooked(e.down_proj, h[i : i + 1]) for i, e in enumerate(experts)]
        if any(r is None or r.shape != (1, h.shape[1]) or r.dtype != h.dtype for r in rows):
            return None
        h = torch.cat(rows)
    return affine_experts(h, down, route.reshape(-1))


def affine_only(layer: nn.Module, no_pre_hooks: bool = True) -> AffineWeight | None:
    """A 4-bit kernel layer's weight, if calling it computes x · Wᵀ alone (no bias, no shared
    call, no output hooks; input hooks only where ``no_pre_hooks`` is False)."""
    if not (isinstance(layer, AffineKernelLinear) and layer.bits == 4 and layer.bias is None
            and layer.shared is None and not _hooked(layer, pre=no_pre_hooks)):  # fmt: skip
        return None
    return layer.affine_weight()


def _hooked(module: nn.Module, pre: bool) -> bool:
    """Whether calling ``module`` runs output hooks (and, with ``pre``, input hooks), or input
    hooks that take keyword arguments."""
    return bool(module._forward_hooks or module._forward_pre_hooks_with_kwargs
                or (pre and module._forward_pre_hooks))  # fmt: skip


def global_hooks() -> bool:
    """Whether global forward hooks (``register_module_forward_hook``) are set."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _pre_hooked(layer: nn.Module, x: Tensor) -> Tensor | None:
    """x after ``layer``'s input hooks, as calling the layer passes it to ``forward``."""
    args = (x,)
    for hook in layer._forward_pre_hooks.values():
        result = hook(layer, args)
        if result is not None:
            args = result if isinstance(result, tuple) else (result,)
    return args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
