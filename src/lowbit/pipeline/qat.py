"""Quantization-aware training: fine-tune the planned layers on their grid, then pack them.

The recipe's layers become :class:`FakeQuantLinear` (float weights trained through the
straight-through estimator, learnable scales and offsets), the model is trained for ``steps``
batches of training windows, and each layer is then packed into a :class:`QuantLinear` that
computes exactly what it computed in training. The loss is the causal-LM cross-entropy on the
training text (``ce``), the KL divergence to the float model's next-token distribution (``kl``:
self-distillation, which needs no labels and pulls the model back towards its own float
behaviour rather than towards the training text's style), or their sum.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.models.modules import set_module, untie_if_needed
from lowbit.models.normalize import conv1d_to_linear
from lowbit.nn import QuantLinear
from lowbit.nn.fake_linear import FakeQuantLinear
from lowbit.pipeline.plan import plan_model
from lowbit.pipeline.report import LayerReport, QuantizeReport
from lowbit.primitives import sqnr_db
from lowbit.primitives.metrics import all_finite
from lowbit.recipes import Recipe
from lowbit.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)
LOSSES = ("kl", "ce", "ce+kl")


@dataclass(frozen=True)
class QATOptions:
    steps: int = 200
    lr: float = 1e-5
    batch_size: int = 2
    loss: str = "kl"
    learn_scales: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 0 < self.lr <= 1:
            raise LowbitError(
                "qat: steps and batch size must be >= 1 and lr in (0, 1] "
                f"(AdamW's step moves each weight by about lr), got lr {self.lr}"
            )
        if self.loss not in LOSSES:
            raise LowbitError(f"qat: loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")


def fake_quantize_model(model: nn.Module, recipe: Recipe, learn_scales: bool = True) -> dict:
    """Swap the recipe's layers for FakeQuantLinear (in place); {name: fake layer}."""
    if recipe.tune is not None:
        raise LowbitError("qat trains the weights and scales itself; drop tune from the recipe")
    if recipe.activations is not None or recipe.algorithm != "rtn":
        raise LowbitError(
            "qat starts from an RTN weight-only recipe (algorithm: rtn, no activations); "
            "the training replaces the calibrated algorithms"
        )
    other = [key for key in ("lkd", "smoothquant", "attention") if getattr(recipe, key) is not None]
    if other:  # steps only the quantize pipeline runs: not silently skipped
        raise LowbitError(f"qat does not run the recipe's {other[0]}: step; drop it, or use "
                          f"lowbit quantize")  # fmt: skip
    conv1d_to_linear(model)
    was = model.training
    model.train()  # the layers a training forward reads as tensors stay float (Mamba's fused
    try:  # path reads x_proj's and out_proj's weights when training)
        layers, plan = plan_model(recipe, model)  # linears: QAT does not train convolutions
    finally:
        model.train(was)
    if any(spec.lorc_rank for spec in plan.values()):
        raise LowbitError("qat does not train LoRC corrections; drop lorc_rank")
    fakes = {}
    for name, module in layers:
        if name in plan:
            fakes[name] = FakeQuantLinear(module, plan[name], name, learn_scales)
            set_module(model, name, fakes[name])
    untie_if_needed(model, set(plan))
    return fakes


def pack_model(model: nn.Module, fakes: dict, recipe: Recipe) -> QuantizeReport:
    """Replace each FakeQuantLinear by the QuantLinear of exactly its weight."""
    report = QuantizeReport(recipe)
    for name, fake in fakes.items():
        qw = fake.to_quantized()
        dequantized = qw.dequantize()
        if not all_finite(dequantized):  # (the last step's update is checked by no later loss)
            raise LowbitError(f"qat: {name}'s trained weights or scales are not finite; "
                              f"lower --lr")  # fmt: skip
        layer = QuantLinear.from_quantized(qw, fake.bias, name)
        report.layers[name] = LayerReport(
            qw.spec, fake.in_features, fake.out_features, fake.bias is not None,
            layer.bits_per_weight(), sqnr_db(fake.weight.detach(), dequantized),
        )  # fmt: skip
        set_module(model, name, layer)
    return report


def _loss(model: nn.Module, teacher: nn.Module | None, ids: Tensor, kind: str) -> Tensor:
    logits = model(ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    loss = logits.new_zeros(())
    if "ce" in kind:
        loss = loss + F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    if "kl" in kind:
        with torch.no_grad():
            ref = F.log_softmax(teacher(ids, use_cache=False).logits[:, :-1].float(), -1)
        logp = F.log_softmax(logits, -1)
        loss = loss + F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1).mean()
    return loss


def qat(
    model: nn.Module,
    recipe: Recipe,
    train: CalibrationSet,
    options: QATOptions,
    progress: bool = True,
) -> QuantizeReport:
    """Train ``model``'s recipe layers on their grids with ``train`` windows, then pack them."""
    start = time.perf_counter()
    fakes, losses = train_fake_quant(model, recipe, train, options, progress)
    with torch.no_grad():
        report = pack_model(model, fakes, recipe)
    last = sum(losses[-10:]) / len(losses[-10:])
    report.calibration = train
    report.qat = {"steps": options.steps, "lr": options.lr, "batch_size": options.batch_size,
                  "loss": options.loss, "learn_scales": options.learn_scales,
                  "first_loss": losses[0], "last_loss": last}  # fmt: skip
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    log.info("qat: %d steps, loss %.4f -> %.4f", options.steps, losses[0], last)
    return report


def require_windows(options: QATOptions, train: CalibrationSet) -> None:
    """Training holds ``steps`` x ``batch_size`` windows (checked before any work)."""
    need = options.steps * options.batch_size
    if len(train.windows) < need:
        raise LowbitError(f"qat needs {need} training windows ({options.steps} steps x batch "
                          f"{options.batch_size}), got {len(train.windows)}")  # fmt: skip


@torch.enable_grad()  # a caller's no_grad block would stop the training
def train_fake_quant(
    model: nn.Module,
    recipe: Recipe,
    train: CalibrationSet,
    options: QATOptions,
    progress: bool = True,
) -> tuple[dict[str, FakeQuantLinear], list[float]]:
    """The training half of :func:`qat`: ``model`` keeps its FakeQuantLinear layers (in eval
    mode, frozen); returns them and the loss per step. :func:`pack_model` finishes the job."""
    require_windows(options, train)
    teacher = copy.deepcopy(model).eval() if "kl" in options.loss else None
    fakes = fake_quantize_model(model, recipe, options.learn_scales)
    params = [p for fake in fakes.values() for p in fake.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    model.eval()  # no dropout (the KL teacher has none; GPT-2's 0.1 made the first step's KL
    # 1.6e-3 instead of 2e-7 at 8 bits) nor router noise; gradients still flow
    bar = tqdm(range(options.steps), desc=f"qat ({options.loss})", unit="step",
               disable=not progress)  # fmt: skip
    losses = []
    for step in bar:
        ids = train.windows[step * options.batch_size : (step + 1) * options.batch_size]
        loss = _loss(model, teacher, ids, options.loss)
        if not torch.isfinite(loss):
            raise LowbitError(f"qat: the loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return fakes, losses
