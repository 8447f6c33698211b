"""Which module feeds which linears in a decoder block, found by running the block once.

AWQ and SmoothQuant fold per-channel scales into the module that feeds a group of linears, and
true-sequential GPTQ quantizes the linears in the order the block reads them. Hand-written
mappings (:mod:`lowbit.models.families`) cover a few families; any other decoder block is
traced on one calibration batch instead:

1. Hooks record each linear's input tensor and which module produced each tensor. Linears that
   read the very same tensor form a group (q/k/v, gate/up), in the order the block uses them.
   Ungrouped convolutions count as linears (an image model traced whole: a convolution feeds
   the next through a LeakyReLU).
2. For each group the candidate feeders are the module that produced its input when it holds a
   per-channel weight of the group's width (a norm: ``weight / s`` or Gemma's ``(1 + weight) /
   s``), else the linears run before it whose output width matches (``up_proj`` before
   ``down_proj``, ``v_proj`` before ``o_proj``), the latest two.
3. A candidate is kept only if folding random scales into it leaves the block's output unchanged
   (relative error below 1e-4): a norm whose output also feeds something else, a GELU between
   two linears, or a feeder of the wrong kind fails that test and is never used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.models.experts import ExpertMLP
from lowbit.models.families import Family, PrevKind, ScaleGroup
from lowbit.models.fold import can_fold, fold_scales, folded_tensors, in_width, out_width

TOLERANCE = 1e-4  # relative max error of the block's output after folding random scales
# earlier linears tested as a group's feeder, nearest first: each test is a forward pass, and a
# model traced whole (a UNet: hundreds of convolutions, none foldable through GroupNorm + SiLU)
# would otherwise run one per earlier layer of the same width for every group
NEAREST_FEEDERS = 2
# the float64 input sums that one group of a mixture's experts may hold at once (GPTQ's
# Hessians: 33.5 MB per linear of width 2048, 411 MB at DeepSeek-V3's 7168)
HESSIAN_BUDGET = 1 << 30


@torch.no_grad()
def derive_family(block: nn.Module, run: Callable[[], Tensor], blocks: str = "") -> Family:
    """The wiring of ``block`` (``run()`` computes its output on one calibration batch) as a
    :class:`Family`: the linears' groups in reading order and every scale group that folds
    exactly."""
    groups, producers, order = _trace(block, run)
    reference = run().float()
    experts = [n for n, m in block.named_modules() if isinstance(m, ExpertMLP)]
    routed = {f"{e}.{part}" for e in experts for part in ("gate_proj", "up_proj", "down_proj")}
    scale_groups = []
    sequential: list[tuple[str, ...]] = []
    for group, source in zip(groups, producers, strict=True):
        if routed.intersection(group):  # a mixture's experts: wired below, all of them
            if not any(routed.intersection(g) for g in sequential):
                sequential += _expert_groups(block, experts)
            continue
        sequential.append(tuple(group))
        for prev, kind in _candidates(block, group, source, order, routed):
            if _folds_exactly(block, run, reference, prev, kind, group):
                scale_groups.append(ScaleGroup(prev, tuple(group), _inspect(group), kind))
                break
    if experts and not any(routed.intersection(g) for g in sequential):
        sequential += _expert_groups(block, experts)  # none was reached by the traced batch
    scale_groups += [ScaleGroup(f"{e}.up_proj", (f"{e}.down_proj",), e, "linear") for e in experts]
    return Family("derived", (), blocks, tuple(sequential), tuple(scale_groups))


def _expert_groups(block: nn.Module, experts: list[str]) -> list[tuple[str, ...]]:
    """The experts' linears in reading order: experts' gate and up, then their down, in as few
    groups (calibration passes) as keep one group's float64 input sums (GPTQ's Hessians)
    within :data:`HESSIAN_BUDGET`. They are not traced: which experts a batch reaches depends
    on the batch (and differs between the ranks of a distributed run), while their wiring is
    fixed: gate and up read the routed tokens, down reads their product, and scales fold
    exactly from up into down (``down(act(gate) * up)``)."""

    def chunks(parts: tuple[str, ...]) -> list[tuple[str, ...]]:
        # (a linear, or already its quantized module when LKD traces: in_features either way)
        width = block.get_submodule(f"{experts[0]}.{parts[0]}").in_features
        per = max(1, HESSIAN_BUDGET // (len(parts) * width * width * 8))
        return [tuple(f"{e}.{p}" for e in experts[i : i + per] for p in parts)
                for i in range(0, len(experts), per)]  # fmt: skip

    return chunks(("gate_proj", "up_proj")) + chunks(("down_proj",))


def _trace(block: nn.Module, run: Callable[[], Tensor]):
    """(groups of linears reading one tensor, the module that produced each group's input, the
    linears in the order they ran)."""
    made: dict[int, str] = {}
    read: list[tuple[str, int]] = []
    alive: list[Tensor] = []  # keeps every traced tensor alive, so no id is reused

    def after(name: str):
        def hook(module: nn.Module, args: tuple, out) -> None:
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, Tensor):
                alive.append(out)
                made.setdefault(id(out), name)  # the innermost module wins

        return hook

    def before(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                alive.append(args[0])
                read.append((name, id(args[0])))

        return hook

    handles = []
    for name, module in block.named_modules():
        if name:
            handles.append(module.register_forward_hook(after(name)))
        if in_width(module) is not None:  # a linear or an ungrouped convolution
            handles.append(module.register_forward_pre_hook(before(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    order: list[str] = []
    for name, tensor in read:
        if name not in order:
            order.append(name)
            groups.setdefault(tensor, []).append(name)
    return list(groups.values()), [made.get(t) for t in groups], order


def _candidates(block: nn.Module, group: list[str], source: str | None, order: list[str],
                routed: set[str]) -> list[tuple[str, PrevKind]]:  # fmt: skip
    """Feeders worth testing for ``group``, most likely first (never an expert's linear: its
    output reaches the block scaled by the router's weights)."""
    linears = [block.get_submodule(n) for n in group]
    out: list[tuple[str, PrevKind]] = []
    if source is not None and source not in group:
        module = block.get_submodule(source)
        if out_width(module) is None and can_fold(module, "norm", linears):
            out += [(source, "norm"), (source, "norm_plus_one")]
    earlier = order[: order.index(group[0])]
    feeders = [
        n for n in reversed(earlier)
        if n not in routed and can_fold(block.get_submodule(n), "linear", linears)
    ]  # fmt: skip
    return out + [(name, "linear") for name in feeders[:NEAREST_FEEDERS]]


def _folds_exactly(block: nn.Module, run: Callable[[], Tensor], reference: Tensor, prev: str,
                   kind: PrevKind, group: list[str]) -> bool:  # fmt: skip
    """Whether folding random per-channel scales through ``prev`` into ``group`` leaves the
    block's output as it was (the weights are put back either way)."""
    feeder = block.get_submodule(prev)
    linears = [block.get_submodule(n) for n in group]
    saved = [t.detach().clone() for t in folded_tensors(feeder, linears)]
    width = in_width(linears[0])
    s = torch.empty(width).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(width))
    try:
        fold_scales(feeder, kind, linears, s)
        got = run().float()
    finally:
        for t, old in zip(folded_tensors(feeder, linears), saved, strict=True):
            t.copy_(old)
    scale = reference.abs().max().clamp_min(1e-12)
    return (
        bool(torch.isfinite(got).all()) and float((got - reference).abs().max() / scale) < TOLERANCE
    )


def _inspect(group: list[str]) -> str:
    """The smallest module holding every linear of ``group`` (a lone linear: itself), whose
    output AWQ measures while it searches the group's scales."""
    if len(group) == 1:
        return group[0]
    parts = [n.split(".") for n in group]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)
