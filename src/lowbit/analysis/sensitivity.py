"""Sensitivity analysis: the damage of quantizing one layer alone, for each candidate format.

For every planned layer and candidate format, the layer's weight is replaced by its RTN
fake-quantized value (everything else stays float), and the damage is measured on calibration
inputs: KL(fp ‖ q) of a language model's next-token distribution on token windows, or for an
image model (float image inputs) the mean squared error of its outputs against the float
model's, mapped to [0, 1]. A convolution's weight is its im2col matrix (as it is quantized). A
cheap proxy is measured beside it: the Hessian-weighted error tr(ΔW·H·ΔWᵀ) with H = 2·XᵀX/n from
the same inputs, i.e. the squared output error of the layer on its calibration inputs. How well
the proxy ranks the (layer, format) pairs against the measured damage is reported as a Spearman
rank correlation.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.analysis.kl import mean_kl, reference_logprobs
from lowbit.calibration import collect_input_stats
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.models.modules import forward_logits
from lowbit.nn import QuantLinear
from lowbit.nn.quant_conv import ConvGeometry, is_conv, layer_dims, weight_matrix
from lowbit.primitives import fake_quantize_weight

EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")  # a mixture's expert linears, by index
log = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    """Per (layer, candidate): damage (``metric``: ``kl`` or ``mse``), proxy and storage bits;
    candidates by name."""

    layers: dict[str, int]  # layer -> number of weights
    candidates: dict[str, WeightSpec]
    damage: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> cand -> damage
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)
    bits: dict[str, dict[str, int]] = field(default_factory=dict)  # stored bits, overhead incl.
    tokens: int = 0  # tokens measured on (a language model); images: the number of inputs
    metric: str = "kl"

    def rank_correlation(self, candidate: str | None = None) -> float:
        """Spearman correlation of proxy and KL over layers (one candidate) or all pairs."""
        cands = [candidate] if candidate else list(self.candidates)
        pairs = [(self.proxy[n][c], self.damage[n][c]) for n in self.layers for c in cands
                 if self.candidates[c].format not in ("fp16", "bf16")
                 and not math.isnan(self.proxy[n][c])]  # fmt: skip
        return spearman([p for p, _ in pairs], [k for _, k in pairs])

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "tokens": self.tokens,
            "candidates": {c: s.to_dict() for c, s in self.candidates.items()},
            "rank_correlation": {"all": _round(self.rank_correlation())}
            | {c: _round(self.rank_correlation(c)) for c in self.candidates
               if self.candidates[c].format not in ("fp16", "bf16")},
            "layers": {n: {"weights": w, self.metric: self.damage[n],
                           "proxy": {c: _round(p, None) for c, p in self.proxy[n].items()},
                           "bits": self.bits[n]} for n, w in self.layers.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        """The inverse of :meth:`to_dict` (a saved ``lowbit analyze --out`` file)."""
        cands = {
            c: WeightSpec.from_dict(s, f"candidates.{c}") for c, s in data["candidates"].items()
        }
        layers = data["layers"]
        sens = cls({n: int(v["weights"]) for n, v in layers.items()}, cands)
        sens.tokens, sens.metric = int(data.get("tokens", 0)), str(data.get("metric", "kl"))
        if sens.metric not in ("kl", "mse"):
            raise LowbitError(f"metric: expected kl or mse, got {sens.metric!r}")
        for n, v in layers.items():
            sens.damage[n] = dict(v[sens.metric])
            sens.proxy[n] = {c: math.nan if p is None else p for c, p in v["proxy"].items()}
            sens.bits[n] = {c: int(b) for c, b in v["bits"].items()}
        return sens


def _round(x: float, digits: int | None = 4) -> float | None:
    """JSON's form of a figure: None for NaN (a proxy not measured, a correlation of too few
    pairs)."""
    if math.isnan(x):
        return None
    return x if digits is None else round(x, digits)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs."""
    if len(a) < 3:
        return float("nan")
    ra, rb = (
        _ranks(torch.tensor(a, dtype=torch.float64)),
        _ranks(torch.tensor(b, dtype=torch.float64)),
    )
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):  # ties share their mean rank
        tie = x == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def layer_bits(module: nn.Module, spec: WeightSpec, name: str) -> int:
    """Stored bits of ``module`` in ``spec`` (codes, scales, zeros), as QuantLinear (or
    QuantConv, the same buffers for its matrix) holds them."""
    rows, cols = layer_dims(module)
    layer = QuantLinear(cols, rows, spec, layer=name)
    b = layer.storage_bytes()
    return 8 * (b["codes"] + b["params"])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    candidates: dict[str, WeightSpec],
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = True,
    group: Group | None = None,
    output_range: tuple[float, float] | None = None,
) -> Sensitivity:
    """Measure every (layer, candidate) on ``windows`` (token ids; or float images for an image
    model, whose outputs span ``output_range``); ``model`` is left as it was. Under a process
    ``group`` (default: the initialised one, if any) each rank runs every world-th trial and the
    figures are gathered: they equal one process's."""
    group = group or Group.current()
    sens = Sensitivity({n: m.weight.numel() for n, m in layers.items()}, dict(candidates))
    damage = _damage(model, windows, batch_size, output_range, sens)
    # a grouped convolution has one input matrix per group: no proxy (NaN; its damage is measured)
    single = {n: m for n, m in layers.items() if not is_conv(m) or m.groups == 1}
    hessians, unreached = _hessians(model, single, windows, batch_size)
    trials = [(n, c) for n in layers for c in candidates]
    figures = torch.zeros(len(trials), 2, dtype=torch.float64)  # (trial, [proxy, damage])
    mine = group.mine(len(trials))
    bar = tqdm(total=len(mine), desc="sensitivity", unit="trial", disable=not progress)
    for k in mine:
        name, cname = trials[k]
        module, spec = layers[name], candidates[cname]
        original = module.weight.detach().clone()
        matrix = weight_matrix(module).detach().float()
        q = fake_quantize_weight(matrix, spec, name)
        delta = (q - matrix).double()
        hessian = hessians.get(name)
        figures[k, 0] = (
            math.nan if hessian is None else float(((delta @ hessian.double()) * delta).sum())
        )
        _set_matrix(module, q)
        figures[k, 1] = max(damage(), 0.0)
        module.weight.copy_(original)
        bar.update(1)
        bar.set_postfix(layer=name.rsplit(".", 2)[-2] if "." in name else name)
    bar.close()
    group.sum(figures)  # each trial was measured by one rank; adding zeros is exact
    for (name, cname), (proxy, hurt) in zip(trials, figures.tolist(), strict=True):
        sens.damage.setdefault(name, {})[cname] = hurt
        sens.proxy.setdefault(name, {})[cname] = proxy
        sens.bits.setdefault(name, {})[cname] = layer_bits(layers[name], candidates[cname], name)
    _like_their_siblings(sens, unreached)
    return sens


def _like_their_siblings(sens: Sensitivity, unreached: set[str]) -> None:
    """An expert that no analysis token reached measures no damage, which would give it the
    fewest bits although later text will reach it: it gets the mean damage of its reached
    siblings (the same linear of the block's other experts) instead, since experts are alike
    until the router picks among them."""
    siblings: dict[str, list[str]] = {}
    for name in sens.layers:
        siblings.setdefault(EXPERT_INDEX.sub(".experts.*.", name), []).append(name)
    moved = 0
    for name in unreached:
        seen = [n for n in siblings[EXPERT_INDEX.sub(".experts.*.", name)] if n not in unreached]
        if seen:
            sens.damage[name] = {c: sum(sens.damage[n][c] for n in seen) / len(seen)
                                 for c in sens.candidates}  # fmt: skip
            moved += 1
    if unreached:
        log.info("sensitivity: %d expert layers saw no analysis token; %d take their reached "
                 "siblings' mean damage (analyse on more text to measure them)",
                 len(unreached), moved)  # fmt: skip


def _damage(model: nn.Module, windows: Tensor, batch_size: int,
            output_range: tuple[float, float] | None,
            sens: Sensitivity) -> Callable[[], float]:  # fmt: skip
    """The damage of ``model`` as it is now against itself as it is at this call: KL on token
    windows, or the MSE of an image model's outputs (mapped to [0, 1])."""
    sens.tokens = int(windows.numel())
    if not windows.is_floating_point():
        ref = reference_logprobs(model, windows, batch_size)
        return lambda: mean_kl(model, windows, ref, batch_size)
    from lowbit.eval.image import output_mse, outputs

    if output_range is None:
        raise LowbitError("image inputs need the model's output_range")
    sens.tokens, sens.metric = len(windows), "mse"
    ref = outputs(model, windows, output_range, batch_size)
    return lambda: output_mse(model, windows, ref, output_range, batch_size)


def _set_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write a layer's weight from the matrix it is quantized as."""
    weight = ConvGeometry.of(module).weight(matrix) if is_conv(module) else matrix
    module.weight.copy_(weight.to(module.weight.dtype))


def _hessians(model, layers, windows, batch_size) -> tuple[dict[str, Tensor], set[str]]:
    """Each layer's input Hessian on ``windows``, and the layers that saw no input (experts
    the router sent no token)."""
    with collect_input_stats(layers, hessian=True) as stats:
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size]
            forward_logits(model, ids)
    unreached = {name for name, s in stats.items() if s.rows == 0}
    for name in unreached:  # its weights alone (identity)
        stats[name].empty(layers[name].in_features, hessian=True, absmean=False, absmax=False)
    return {n: s.hessian() for n, s in stats.items()}, unreached
