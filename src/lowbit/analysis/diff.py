"""Which layers broke a quantized model: each quantized layer's share of the final KL.

Every quantized layer of Q is swapped back to the float layer of FP, one at a time, and the
KL(fp ‖ q) of the whole model is measured again; a layer's contribution is how much the KL falls
without its quantization. A broken layer (zero or NaN scales, a far too coarse format) is the
one whose return to float removes most of the damage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.analysis.kl import mean_kl, reference_logprobs
from lowbit.errors import LowbitError
from lowbit.models.modules import set_module
from lowbit.nn import QUANTIZED_MODULES


@dataclass
class Contribution:
    layer: str
    format: str
    kl_without: float  # KL of the model with this layer back in float
    reduction: float  # total KL minus kl_without

    def to_dict(self) -> dict:
        return {"layer": self.layer, "format": self.format, "kl_without": self.kl_without,
                "kl_reduction": self.reduction}  # fmt: skip


@torch.no_grad()
def layer_contributions(
    fp: nn.Module, q: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True
) -> tuple[float, list[Contribution]]:
    """(KL of Q, contributions sorted from the most harmful layer down)."""
    ref = reference_logprobs(fp, windows, batch_size)
    total = _finite_kl(q, windows, ref, batch_size)
    float_layers = dict(fp.named_modules())
    quantized = [(n, m) for n, m in q.named_modules() if isinstance(m, QUANTIZED_MODULES)]
    if not quantized:
        raise LowbitError("the second model has no quantized layers to compare")
    out = []
    for name, module in tqdm(quantized, desc="diff", unit="layer", disable=not progress):
        original = float_layers.get(name)
        if not isinstance(original, nn.Linear):
            raise LowbitError(f"{name} is quantized in Q but is not a linear layer of FP; "
                              f"are FP and Q the same model?")  # fmt: skip
        set_module(q, name, copy.deepcopy(original))
        try:
            without = _finite_kl(q, windows, ref, batch_size)
        finally:
            set_module(q, name, module)
        spec = getattr(module, "spec", None)
        fmt = spec.short() if spec is not None else getattr(module, "kind", type(module).__name__)
        out.append(Contribution(name, fmt, without, _reduction(total, without)))
    out.sort(key=lambda c: -c.reduction)
    return total, out


def _reduction(total: float, without: float) -> float:
    if total == float("inf"):
        return float("inf") if without < total else 0.0
    return total - without


def _finite_kl(model: nn.Module, windows: Tensor, ref: list[Tensor], batch_size: int) -> float:
    """KL, with NaN (a NaN scale poisons every later logit) counted as infinite damage."""
    kl = mean_kl(model, windows, ref, batch_size)
    return kl if kl == kl else float("inf")
