"""Sensitivity analysis: the damage of quantizing one layer alone, for each candidate format.

For every planned layer and candidate format, the layer's weight is replaced by its RTN
fake-quantized value (everything else stays float), and the damage is KL(fp ‖ q) of the model's
next-token distribution on calibration windows. A cheap proxy is measured beside it: the
Hessian-weighted error tr(ΔW·H·ΔWᵀ) with H = 2·XᵀX/n from the same windows, i.e. the squared
output error of the layer on its calibration inputs. How well the proxy ranks the (layer,
format) pairs against the measured KL is reported as a Spearman rank correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.analysis.kl import mean_kl, reference_logprobs
from lowbit.calibration import collect_input_stats
from lowbit.calibration.group import Group
from lowbit.formats.spec import WeightSpec
from lowbit.models.modules import forward_logits
from lowbit.nn import QuantLinear
from lowbit.primitives import fake_quantize_weight


@dataclass
class Sensitivity:
    """Per (layer, candidate): KL damage, proxy and storage bits; candidates by name."""

    layers: dict[str, int]  # layer -> number of weights
    candidates: dict[str, WeightSpec]
    kl: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> cand -> KL
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)
    bits: dict[str, dict[str, int]] = field(default_factory=dict)  # stored bits, overhead incl.
    tokens: int = 0

    def rank_correlation(self, candidate: str | None = None) -> float:
        """Spearman correlation of proxy and KL over layers (one candidate) or all pairs."""
        cands = [candidate] if candidate else list(self.candidates)
        pairs = [(self.proxy[n][c], self.kl[n][c]) for n in self.layers for c in cands
                 if self.candidates[c].format not in ("fp16", "bf16")]  # fmt: skip
        return spearman([p for p, _ in pairs], [k for _, k in pairs])

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "candidates": {c: s.to_dict() for c, s in self.candidates.items()},
            "rank_correlation": {"all": _round(self.rank_correlation())}
            | {c: _round(self.rank_correlation(c)) for c in self.candidates
               if self.candidates[c].format not in ("fp16", "bf16")},
            "layers": {n: {"weights": w, "kl": self.kl[n], "proxy": self.proxy[n],
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
        sens.tokens = int(data.get("tokens", 0))
        for n, v in layers.items():
            sens.kl[n], sens.proxy[n] = dict(v["kl"]), dict(v["proxy"])
            sens.bits[n] = {c: int(b) for c, b in v["bits"].items()}
        return sens


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


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


def layer_bits(module: nn.Linear, spec: WeightSpec, name: str) -> int:
    """Stored bits of ``module`` in ``spec`` (codes, scales, zeros), as QuantLinear holds them."""
    layer = QuantLinear(module.in_features, module.out_features, spec, layer=name)
    b = layer.storage_bytes()
    return 8 * (b["codes"] + b["params"])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    candidates: dict[str, WeightSpec],
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = True,
    group: Group | None = None,
) -> Sensitivity:
    """Measure every (layer, candidate) on ``windows``; ``model`` is left as it was. Under a
    process ``group`` (default: the initialised one, if any) each rank runs every world-th
    trial and the figures are gathered: they equal one process's."""
    group = group or Group.current()
    sens = Sensitivity({n: m.weight.numel() for n, m in layers.items()}, dict(candidates))
    sens.tokens = int(windows.numel())
    ref = reference_logprobs(model, windows, batch_size)
    hessians = _hessians(model, layers, windows, batch_size)
    trials = [(n, c) for n in layers for c in candidates]
    figures = torch.zeros(len(trials), 2, dtype=torch.float64)  # (trial, [proxy, KL])
    mine = group.mine(len(trials))
    bar = tqdm(total=len(mine), desc="sensitivity", unit="trial", disable=not progress)
    for k in mine:
        name, cname = trials[k]
        module, spec = layers[name], candidates[cname]
        original = module.weight.detach().clone()
        q = fake_quantize_weight(original.float(), spec, name)
        delta = (q - original.float()).double()
        figures[k, 0] = float(((delta @ hessians[name].double()) * delta).sum())
        module.weight.copy_(q.to(module.weight.dtype))
        figures[k, 1] = max(mean_kl(model, windows, ref, batch_size), 0.0)
        module.weight.copy_(original)
        bar.update(1)
        bar.set_postfix(layer=name.rsplit(".", 2)[-2] if "." in name else name)
    bar.close()
    group.sum(figures)  # each trial was measured by one rank; adding zeros is exact
    for (name, cname), (proxy, kl) in zip(trials, figures.tolist(), strict=True):
        sens.kl.setdefault(name, {})[cname] = kl
        sens.proxy.setdefault(name, {})[cname] = proxy
        sens.bits.setdefault(name, {})[cname] = layer_bits(layers[name], candidates[cname], name)
    return sens


def _hessians(model, layers, windows, batch_size) -> dict[str, Tensor]:
    with collect_input_stats(layers, hessian=True) as stats:
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size]
            forward_logits(model, ids)
    return {n: s.hessian() for n, s in stats.items()}
