"""Swap a loaded model's quantized layers for their fast-kernel modules (once, at load time)."""

from __future__ import annotations

from torch import nn

from lowbit.models.experts import RouterLinear
from lowbit.models.families import family_of, find_blocks
from lowbit.models.modules import set_module
from lowbit.nn import AffineKernelLinear, Int8KernelLinear, QuantConv, QuantLinear, kernel_module
from lowbit.nn.fused import fuse_activations
from lowbit.nn.kernel_conv import affine_conv_module
from lowbit.nn.kernel_linear import HalfKernelLinear
from lowbit.nn.kernel_tensor import tensor_kernel_module
from lowbit.nn.shared_input import share_input


def use_kernels(model: nn.Module) -> dict[str, int]:
    """Swap every QuantLinear a kernel covers for its fast module; counts per kind (``reference``:
    layers left on the reference path; ``shared-input groups``: sibling layers that run as one
    call, see :func:`share_inputs`)."""
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        conv = isinstance(module, QuantConv)
        fast = (tensor_kernel_module(module) or affine_conv_module(module)) if conv \
            else kernel_module(module)  # fmt: skip
        kind = "reference" if fast is None else fast.kind
        counts[kind] = counts.get(kind, 0) + 1
        if fast is not None:
            set_module(model, name, fast)
    shared = share_inputs(model)
    if shared:
        counts["shared-input groups"] = shared
    fused = fuse_activations(model)
    if fused:
        counts["fused activations"] = fused
    return counts


# Mixture families whose attention is a llama block's (q/k/v read the normed input, which
# nothing writes in between); their MLPs are experts, so only q/k/v are joined.
MIXTURE_ATTENTION = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")


def share_inputs(model: nn.Module) -> int:
    """In each decoder block of a known family, run the kernel layers that read one input (the
    family's q/k/v and gate/up groups; q/k/v in :data:`MIXTURE_ATTENTION`'s) as one call; the
    number of groups so joined."""
    family = family_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if family is not None:
        groups, blocks = family.sequential, find_blocks(model)[1]
    elif model_type in MIXTURE_ATTENTION:
        groups = (tuple(f"self_attn.{p}_proj" for p in "qkv"),)
        try:
            blocks = model.get_submodule("model.layers")
        except AttributeError:  # not a causal LM's usual layout
            return 0
    else:
        return 0
    joined = 0
    for block in blocks:
        modules = dict(block.named_modules())
        for group in groups:
            layers = [modules.get(name) for name in group]
            if all(isinstance(m, (AffineKernelLinear, Int8KernelLinear)) for m in layers):
                joined += share_input(layers)
    return joined


def pooled_layers(module: nn.Module) -> bool:
    """Whether every layer under ``module``, routers aside, runs on lowbit's pooled decode
    kernels (4/8-bit affine or 16-bit float kernel layers; not float32 ``nn.Linear``, the
    reference path, W8A8 or convolutions): then a decode step needs no torch threads
    (:func:`lowbit.kernels.threads.torch_ops_on_one_thread`)."""
    for m in module.modules():
        if isinstance(m, (RouterLinear, AffineKernelLinear, HalfKernelLinear)):
            continue
        if isinstance(m, (nn.Linear, QuantLinear, nn.modules.conv._ConvNd)):
            return False
        if hasattr(m, "storage_tensors"):  # another kernel module
            return False
    return True
