"""How the compact forward (:mod:`lowbit.runtime.llama`) calls a layer: the cheapest call of
a float, 4/8-bit or W8A8 layer on a decode row (:func:`direct`: the native op itself, skipping
the module's Python checks), on a prompt (:func:`prompt_call`: int8 inputs for 4-bit codes,
llama.cpp's prompt arithmetic), and layers that share one input as one call (:func:`joint`,
:func:`direct_group`; :mod:`lowbit.nn.shared_input`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.nn.online import online_transform


def online_call(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """:func:`direct`, after the online rotation of the layer's input when it has one and the
    call is the native op (which skips the module's hooks; calling the module runs them)."""
    call, online = direct(module), online_transform(module)
    return call if online is None or call is module else lambda x: call(online.apply(x))


class Native:
    """A layer's decode call on the native ops: ``parts`` side by side, each ``(kind, group,
    bits, tensors)``: float weights (kind 0, ``(w,)``), affine codes (kind 1, ``(codes,
    scale, offset)``, inputs rounded to int8 per block of 32 at every batch size) or W8A8
    codes (kind 2, ``(panels or codes, scale)``, inputs rounded per row).
    Callable on a (B, C) input, and what the one-call step (``lowbit_cpu::decode_step``,
    :attr:`LlamaForward._step`) reads."""

    def __init__(self, parts: list[tuple[int, int, int, tuple[Tensor, ...]]]) -> None:
        self.parts = parts
        self.calls = [self._call(*part) for part in parts]

    @staticmethod
    def _call(kind: int, group: int, bits: int, ts: tuple[Tensor, ...]) -> Callable:
        ops = torch.ops.lowbit_cpu
        if kind == 0:
            return functools.partial(ops.float_linear, w=ts[0])
        if kind == 2:
            op = ops.int8_linear if ts[0].dim() == 3 else ops.int8_linear_mm
            return lambda x: op(x, *ts)
        # int8 inputs at every size (past 32 rows, a batch too big for the one-call step, the
        # prompts' integer GEMM)
        return lambda x: ops.affine_linear(x, *ts, group, bits, True)

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.calls) == 1:
            return self.calls[0](x)
        return torch.cat([call(x) for call in self.calls], dim=-1)


def direct(module: nn.Module | Callable, aw=None) -> Callable[[Tensor], Tensor]:
    """The cheapest call of a layer on a (B, C) decode input: a :class:`Native` of the affine
    or W8A8 op itself for kernel layers that need no padding and no bias (Python checks and
    reshapes cost as much as a small layer's arithmetic at decode) or of the native float
    GEMV for plain float32 linear layers without bias or hooks (torch's read float32 weights
    at a third of the read bandwidth on some CPUs: see csrc/float_gemv.cpp), else the module.
    ``aw``: the weight of a joint call (an ``AffineWeight`` or an ``Int8Weight``)."""
    from lowbit.kernels.int8 import Int8Weight
    from lowbit.nn.kernel_linear import AffineKernelLinear, Int8KernelLinear

    if plain_float(module):
        return Native([(0, 0, 0, (module.weight.detach(),))])
    if isinstance(module, Int8KernelLinear) and module.shared is None and module.bias is None:
        aw = module.weight_int8
    if isinstance(aw, Int8Weight):
        held = aw.panels if aw.panels is not None else aw.codes if aw.mm else None
        return module if held is None else Native([(2, 0, 8, (held, aw.scale))])
    plain = isinstance(module, AffineKernelLinear) and module.shared is None and module.bias is None
    if aw is None and plain:
        from lowbit.kernels.affine import AffineWeight

        aw = AffineWeight(module.w, module.scale, module.offset, module.group, module.bits,
                          module.in_features)  # fmt: skip
    if aw is None or aw.padded_in != aw.in_features:
        return module  # (or the joint call the caller passed)
    return Native([(1, aw.group, aw.bits, (aw.w, aw.scale, aw.offset))])


def plain_float(module: nn.Module | Callable) -> bool:
    """Whether ``module`` is an ``nn.Linear`` with a contiguous float32 weight, no bias or hooks."""
    return (
        type(module) is nn.Linear
        and module.bias is None
        and module.weight.dtype == torch.float32
        and module.weight.is_contiguous()
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def prompt_call(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A layer on (B, T, C) inputs in the loop: a 4- or 8-bit kernel layer quantizes its
    inputs to int8 per block of 32 at every size (a prompt's: the integer GEMM, llama.cpp's
    prompt arithmetic; a decode step's: the integer GEMV), where the module itself keeps float
    inputs for evaluation windows; other layers are their module."""
    from lowbit.nn.kernel_linear import AffineKernelLinear

    if not isinstance(module, AffineKernelLinear) or module.shared is not None:
        return module
    from lowbit.kernels.affine import AffineWeight, affine_linear

    aw = AffineWeight(module.w, module.scale, module.offset, module.group, module.bits,
                      module.in_features)  # fmt: skip
    online, bias = online_transform(module), module.bias

    def call(x: Tensor) -> Tensor:
        y = affine_linear(x if online is None else online.apply(x), aw, act8=True)
        return y if bias is None else y + bias

    return call


def joint(modules: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    """x -> the modules' outputs side by side; one kernel call when they share a fused weight
    (on int8 inputs, as :func:`prompt_call`)."""
    if len(modules) == 1:  # a fused weight of the checkpoint's own (Phi-3's qkv_proj)
        return prompt_call(modules[0])
    shared = shared_of(modules)
    if shared is None:
        calls = [prompt_call(m) for m in modules]
        return lambda x: torch.cat([c(x) for c in calls], dim=-1)
    from lowbit.kernels.affine import AffineWeight, affine_linear

    aw = shared.weight
    if isinstance(aw, AffineWeight):

        def call(x: Tensor) -> Tensor:
            return affine_linear(x, aw, act8=True)

    else:
        call = shared  # W8A8: per-token int8 inputs at every size already

    sizes = [m.rows[1] - m.rows[0] for m in modules]
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return call
    bias = torch.cat([torch.zeros(n) if b is None else b.detach()
                      for b, n in zip(biases, sizes, strict=True)])  # fmt: skip
    return lambda x: call(x) + bias


def direct_group(modules: list[nn.Module], joint: Callable) -> Callable[[Tensor], Tensor]:
    """:func:`direct` for layers that run as one fused call (no biases) or are all plain float
    layers (one native call each), else ``joint``."""
    if len(modules) == 1:
        return direct(modules[0])
    if all(plain_float(m) for m in modules):
        return Native([part for m in modules for part in direct(m).parts])
    shared = shared_of(modules)
    if shared is None or any(m.bias is not None for m in modules):
        return joint
    return direct(joint, shared.weight)


def shared_of(modules: list[nn.Module]):
    """The fused weight ``modules`` share (:mod:`lowbit.nn.shared_input`), or None."""
    shared = getattr(modules[0], "shared", None)
    if shared is None or any(getattr(m, "shared", None) is not shared for m in modules):
        return None
    return shared
