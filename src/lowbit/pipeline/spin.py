"""SpinQuant's learned rotation (Liu et al. 2024): the residual stream's orthogonal matrix Q
(R1) and, with ``heads`` (and ``learn_heads``), each block's head-size matrix of the values
and o_proj (R2), trained so that the *quantized* model predicts the calibration text well.

Starting from the Hadamard matrices QuaRot would fold
(:func:`lowbit.algorithms.rotate.orthogonal`), each step runs one calibration window through
the model with every planned linear's weight replaced by its rotated value
(:class:`lowbit.models.rotate.Rotator`, differentiable in the matrices) on the recipe's grid
(round-to-nearest with a straight-through gradient, as SpinQuant trains; a calibrated algorithm
such as GPTQ then runs on the rotated model), the planned linears' inputs rounded as the
recipe's activations are (dynamic ranges, straight through), and the online transforms in
place. The next-token cross-entropy's gradient with respect to each matrix moves it by one
Cayley step (:func:`lowbit.algorithms.rotate.cayley_step`), so every matrix stays exactly
orthogonal and the float model's function is unchanged once they are folded. The embedding and
an unquantized head are not recomputed: the stream is turned by Q after the embedding and back
before the final norm, which is the same function at a fraction of the cost. The key/value
cache is not rounded in the loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lowbit.algorithms.rotate import cayley_step, orthogonal
from lowbit.calibration import CalibrationSet
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks
from lowbit.models.rotate import Rotator, install_online_rotations
from lowbit.models.source import TensorSource, materialize, release, skeleton
from lowbit.models.workdir import WorkFolder
from lowbit.pipeline.plan import plan_model
from lowbit.primitives.activations import fake_quantize_dynamic
from lowbit.primitives.fake import fake_quantize_weight
from lowbit.recipes import Recipe

log = logging.getLogger(__name__)
KEPT = "rotation"  # the work folder's name for the learned matrices
Learned = tuple[Tensor, Tensor | None]  # Q, and the per-block head matrices (or None)


def learned_matrix(model: nn.Module, recipe: Recipe, calibration: CalibrationSet | None,
                   progress: bool = True) -> Learned | None:  # fmt: skip
    """The matrices to fold for ``recipe.rotate`` into the float ``model`` held in memory:
    (Q, heads) learned for kind ``learned``, None (the options say it all) otherwise."""
    if recipe.rotate is None or recipe.rotate.kind != "learned":
        return None
    q, heads, _ = learn_rotation(model, recipe, calibration, progress)
    return q, heads


def streamed_matrix(folder, tensors: TensorSource, recipe: Recipe,
                    calibration: CalibrationSet | None, work: WorkFolder, group: Group,
                    progress: bool = True) -> Learned | None:  # fmt: skip
    """:func:`learned_matrix` for a run that streams ``folder``: the float model is read
    whole into memory for the training (a learned rotation back-propagates through every
    block), then freed. Rank 0 trains and every rank folds its matrix; a resumed run reads
    it from the work folder instead of training again."""
    if recipe.rotate is None or recipe.rotate.kind != "learned":
        return None
    kept = None
    if group.main:
        kept = work.stored(KEPT)
        if kept is None:
            model = skeleton(folder)
            log.info("rotate (learned): the float model is held in memory while it is trained")
            materialize(model, list(tensors.entries), tensors)
            q, heads = learned_matrix(model, recipe, calibration, progress)
            release(model)
            kept = {"q": q} if heads is None else {"q": q, "heads": heads}
            work.store(KEPT, kept)
    kept = group.broadcast(kept, 0)
    heads = kept.get("heads")  # none kept (learn_heads off): the shared head matrix
    return kept["q"].double(), None if heads is None else heads.double()


@torch.enable_grad()  # a caller's no_grad block would stop the training
def learn_rotation(
    model: nn.Module, recipe: Recipe, calibration: CalibrationSet | None, progress: bool = True
) -> tuple[Tensor, Tensor | None, list[float]]:
    """The trained (hidden, hidden) float64 matrix for ``recipe.rotate`` (kind ``learned``) of
    the float ``model`` (held in memory, left with its online transforms installed and its
    weights unchanged), with ``heads`` the trained (blocks, head size, head size) ones (else
    None), and the loss of each step."""
    options = recipe.rotate
    windows = None if calibration is None else calibration.windows
    if not isinstance(windows, Tensor) or windows.is_floating_point():
        raise LowbitError("rotate: kind learned trains on calibration text (pass --calib)")
    hidden = model.config.hidden_size
    rotator = Rotator(model, options, orthogonal(hidden, options))
    plan = plan_model(recipe, model, warn=False)[1]
    install_online_rotations(model, options)
    if not plan and recipe.activations is None:
        log.warning("rotate (learned): the recipe rounds no weights or activations, which is "
                    "what the training looks at; the matrix stays at its start (use kind: "
                    "hadamard, or give the recipe weights)")  # fmt: skip
    base = {k: v.detach().float() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device  # the matrices follow the model (a GPU too)
    heads = None  # the shared Hadamard head matrix stays, unless each block learns its own
    if rotator.h is not None and options.learn_heads:
        blocks = len(find_blocks(model)[1])
        heads = rotator.h.to(device).expand(blocks, -1, -1).clone()
    rotator.h = None if rotator.h is None else rotator.h.float().to(device)
    rotator.online_dtype, rotator.online_device = torch.float32, device
    ends = rotator.ends
    head_quantized = ends["head"].removesuffix(".weight") in plan
    names = [n for n in rotator.ops if n != ends["embed"]]
    if not head_quantized:  # the head keeps its float weight; the stream is turned back
        names = [n for n in names if n not in (ends["head"], ends["norm"])]
    q = rotator.q.to(device)
    state: dict[str, Tensor] = {}  # the float32 matrix of the step, read by the hooks
    hooks = _hooks(model, recipe, plan, ends, head_quantized, lambda: state["q"])
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(options.steps), desc="rotate (learned)", unit="step", disable=not progress)
    try:
        for step in bar:
            current = state["q"] = rotator.q = q.float().requires_grad_(True)
            trained = [current]
            if heads is not None:
                rotator.heads = heads.float().requires_grad_(True)
                trained.append(rotator.heads)
            params = {}
            for name in names:
                t = rotator.tensor(name, base.__getitem__)
                layer = name.removesuffix(".weight")
                if layer in plan and name.endswith(".weight"):
                    t = fake_quantize_weight(t, plan[layer], layer)
                params[name] = t
            ids = calibration.windows[step % len(calibration.windows)][None].to(device)
            logits = functional_call(model, params, (ids,), {"use_cache": False},
                                     tie_weights=False, strict=False).logits  # fmt: skip
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            if not torch.isfinite(loss):
                raise LowbitError(f"rotate: the loss became {loss.item()} at step {step}; lower "
                                  f"rotate.lr")  # fmt: skip
            grads = torch.autograd.grad(loss, trained)
            lr = options.lr * (1 - step / options.steps)
            q = cayley_step(q, grads[0], lr)
            if heads is not None:
                heads = torch.stack(
                    [cayley_step(h, g, lr) for h, g in zip(heads, grads[1], strict=True)]
                )
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    finally:
        for h in hooks:
            h.remove()
    first, last = losses[:10], losses[-10:]
    log.info("rotate (learned): %d steps in %.1f s, loss %.4f -> %.4f (means of the first and "
             "last 10)", options.steps, time.perf_counter() - start, sum(first) / len(first),
             sum(last) / len(last))  # fmt: skip
    return q.cpu(), None if heads is None else heads.cpu(), losses


def _hooks(model: nn.Module, recipe: Recipe, plan: dict, ends: dict, head_quantized: bool,
           q: Callable[[], Tensor]) -> list:  # fmt: skip
    """Forward hooks for the learning pass: the stream turned after the embedding (and back
    before the final norm when the head is not recomputed), the planned linears' inputs
    rounded as the recipe's activations would be, with a straight-through gradient."""
    hooks = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out @ q())]
    if not head_quantized:
        norm = model.get_submodule(ends["norm"].removesuffix(".weight"))
        hooks.append(norm.register_forward_pre_hook(lambda m, a: (a[0] @ q().T, *a[1:])))
    spec = recipe.activations
    if spec is not None:

        def rounded(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x + (fake_quantize_dynamic(x, spec) - x).detach(), *args[1:])

        for name in plan:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(rounded))
    return hooks
