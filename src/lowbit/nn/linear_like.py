"""Which ``nn.Linear`` subclasses compute a plain linear map.

Model code subclasses ``nn.Linear`` both for layers that are linear (Falcon's ``FalconLinear``
only rewrites ``x @ W.T + b``) and for layers that are not (MoE routers that return top-k
choices, BitNet's layer that quantizes its own inputs, LoRA-carrying layers). No library says
which is which, so a subclass that overrides ``forward`` is asked once: run its forward on a
small random weight and input and compare with ``F.linear``. A subclass that sets the class
or instance attribute ``keeps_float`` (lowbit's routers) is never a layer to quantize.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_IN, _OUT, _ROWS = 5, 3, 2


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a subclass whose forward computes the same map
    (decided on a stand-in with a small random weight: the module's own weight may be on the
    meta device or large)."""
    if not isinstance(module, nn.Linear) or getattr(module, "keeps_float", False):
        return False
    if type(module) is nn.Linear:
        return True
    if type(module).forward is nn.Linear.forward:
        return True
    return _computes_linear(module)


def _computes_linear(module: nn.Linear) -> bool:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(_OUT, _IN, generator=gen, device="cpu")  # even under a meta context
    bias = torch.randn(_OUT, generator=gen, device="cpu") if module.bias is not None else None
    probe = copy.copy(module)  # with copies of all its state but its weights: a forward may
    for key, value in module.__dict__.items():  # update its buffers, submodules or counters
        if key != "_parameters":
            probe.__dict__[key] = copy.deepcopy(value)
    probe.__dict__["_parameters"] = {
        "weight": nn.Parameter(weight, requires_grad=False),
        "bias": None if bias is None else nn.Parameter(bias, requires_grad=False),
    }
    probe.__dict__.update(in_features=_IN, out_features=_OUT)
    x = torch.randn(_ROWS, _IN, generator=gen, device="cpu")
    try:
        with torch.no_grad():
            y = type(module).forward(probe, x)  # the class's map, without the module's hooks
    except Exception:  # any failure on a plain input means "not a plain linear"
        return False
    if not isinstance(y, Tensor) or y.shape != (_ROWS, _OUT) or y.is_meta:
        return False
    return torch.allclose(y.float(), F.linear(x, weight, bias), atol=1e-5, rtol=1e-4)
