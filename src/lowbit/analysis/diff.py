"""Which layers broke a quantized model: each quantized layer's share of the final damage.

Every quantized layer of Q is swapped back to the float layer of FP, one at a time, and the
damage of the whole model is measured again: KL(fp ‖ q) on text for a language model, the mean
squared error of Q's outputs against FP's on the same inputs for an image model (outputs mapped
to [0, 1]); a layer's contribution is how much the damage falls without its quantization. A
broken layer (zero or NaN scales, a far too coarse format) is the one whose return to float
removes most of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.analysis.kl import mean_kl, reference_logprobs
from lowbit.errors import LowbitError
from lowbit.models.experts import experts_to_linears
from lowbit.models.modules import set_module
from lowbit.models.normalize import conv1d_to_linear
from lowbit.nn import QUANTIZED_MODULES
from lowbit.nn.linear_like import is_linear
from lowbit.nn.quant_conv import CONVS


@dataclass
class Contribution:
    layer: str
    format: str
    without: float  # the damage (KL, or MSE) of the model with this layer back in float
    reduction: float  # total damage minus without
    metric: str = "kl"

    def to_dict(self) -> dict:
        m = self.metric
        return {"layer": self.layer, "format": self.format, f"{m}_without": self.without,
                f"{m}_reduction": self.reduction}  # fmt: skip


@torch.no_grad()
def layer_contributions(
    fp: nn.Module, q: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True
) -> tuple[float, list[Contribution]]:
    """(KL of Q, contributions sorted from the most harmful layer down). FP's layers are first
    made the ones Q was quantized from (GPT-2's Conv1D as linears, a mixture's fused experts
    as one linear each): the same function, the same names."""
    conv1d_to_linear(fp)
    experts_to_linears(fp)
    ref = reference_logprobs(fp, windows, batch_size)
    return _contributions(fp, q, lambda m: _finite_kl(m, windows, ref, batch_size), "kl",
                          progress)  # fmt: skip


@torch.no_grad()
def image_contributions(fp: nn.Module, q: nn.Module, inputs: Tensor,
                        output_range: tuple[float, float], batch_size: int = 16,
                        progress: bool = True) -> tuple[float, list[Contribution]]:  # fmt: skip
    """(MSE of Q's outputs against FP's on ``inputs``, outputs mapped from ``output_range`` to
    [0, 1]; contributions sorted from the most harmful layer down)."""
    from lowbit.eval.image import output_mse, outputs

    ref = outputs(fp, inputs, output_range, batch_size)
    return _contributions(fp, q, lambda m: output_mse(m, inputs, ref, output_range, batch_size),
                          "mse", progress)  # fmt: skip


def _contributions(fp: nn.Module, q: nn.Module, damage: Callable[[nn.Module], float],
                   metric: str, progress: bool) -> tuple[float, list[Contribution]]:  # fmt: skip
    float_layers = dict(fp.named_modules())
    quantized = [(n, m) for n, m in q.named_modules() if isinstance(m, QUANTIZED_MODULES)]
    if not quantized:
        raise LowbitError("the second model has no quantized layers to compare")
    for name, _ in quantized:  # before any measurement
        layer = float_layers.get(name)
        if not (is_linear(layer) or type(layer) in CONVS):
            raise LowbitError(f"{name} is quantized in Q but is not a linear or convolution of "
                              f"FP; are FP and Q the same model?")  # fmt: skip
    total = damage(q)
    out = []
    for name, module in tqdm(quantized, desc="diff", unit="layer", disable=not progress):
        set_module(q, name, copy.deepcopy(float_layers[name]))
        try:
            without = damage(q)
        finally:
            set_module(q, name, module)
        spec = getattr(module, "spec", None)
        fmt = spec.short() if spec is not None else getattr(module, "kind", type(module).__name__)
        out.append(Contribution(name, fmt, without, _reduction(total, without), metric))
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
