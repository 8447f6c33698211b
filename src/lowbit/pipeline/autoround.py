"""The AutoRound block step: learn each planned linear's rounding and clipping, then pack.

Run by the sequential runner in place of the weight algorithm. The block's planned linears are
swapped for :class:`LearnedRoundLinear` twins (frozen float weights, learnable offsets and
range factors, the recipe's activation rounding), trained with sign-SGD
(:mod:`lowbit.algorithms.autoround`) on the block's calibration inputs against the float
block's outputs (recorded before), and swapped back as plain linears holding the packed
weights, so the next block calibrates on the quantized block's outputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.algorithms.autoround import AutoRoundOptions, SignSGD, linear_decay, parameter_groups
from lowbit.algorithms.lkd import distill
from lowbit.calibration import BlockContext
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.nn.learned_round import LearnedRoundLinear
from lowbit.pipeline.lkd import train_block
from lowbit.primitives import QuantizedWeight


def autoround_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    targets: list[Tensor],
    results: dict[str, QuantizedWeight],
    act: ActivationSpec | None,
    options: AutoRoundOptions,
    progress: bool = True,
) -> dict[str, float]:
    """Quantize the block's linears in ``plan`` (local names) by learned rounding towards
    ``targets`` (the float block's outputs, one per calibration call); fills ``results``.
    Returns the relative output loss of round-to-nearest and of the learned rounding."""

    def make(name: str, linear: nn.Linear) -> LearnedRoundLinear:
        return LearnedRoundLinear(linear, plan[name], f"{ctx.name}.{name}", act)

    def train(twins: list[LearnedRoundLinear], student, mean, sync, agree) -> tuple[float, float]:
        def project() -> None:
            for twin in twins:
                twin.project()

        return distill(
            parameter_groups(twins, options), student, targets, options.iters,
            f"autoround {ctx.name}", progress, mean, sync,
            optimizer=lambda groups: SignSGD(groups, options.offset_lr),
            schedule=linear_decay(options.iters), project=project, keep_best=True, agree=agree,
        )  # fmt: skip

    return train_block(ctx, list(plan), make, train, results)
