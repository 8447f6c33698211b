"""Finding the layers lowbit quantizes and swapping modules in place."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.data.inputs import ModelInputs
from lowbit.errors import LowbitError
from lowbit.models.tensor_reads import TensorReads
from lowbit.nn.linear_like import is_linear
from lowbit.nn.steps import select_step

CONVS = (nn.Conv2d, nn.ConvTranspose2d)
log = logging.getLogger("lowbit")


@contextlib.contextmanager
def evaluating(*models: nn.Module | None) -> Iterator[None]:
    """The models in eval mode while the block runs (BatchNorm on its running statistics,
    dropout off), each module's own mode restored after. A model built in Python starts in
    training mode: calibration or evaluation forwards then updated its BatchNorm statistics
    and took their figures from batch statistics."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def quantizable_layers(model: nn.Module, convs: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer (``nn.Linear``, or a subclass that computes the
    same map: :func:`~lowbit.nn.linear_like.is_linear`; with ``convs``, also ``nn.Conv2d`` and
    ``nn.ConvTranspose2d``: image models, quantized whole) in definition order. A layer whose
    parent's code reads its ``.weight`` or ``.bias`` as a tensor instead of calling it (Mamba's
    ``dt_proj``) stays float: a quantized layer holds codes, not a weight."""
    found = [
        (n, m) for n, m in model.named_modules() if is_linear(m) or (convs and type(m) in CONVS)
    ]
    reads = TensorReads()
    kept = [(n, m) for n, m in found if not _read_as_tensor(model, n, reads)]
    if len(kept) < len(found):
        left = sorted({n for n, _ in found} - {n for n, _ in kept})
        log.debug("kept float (their parents read the weight as a tensor): %s", ", ".join(left))
    return kept


def _read_as_tensor(model: nn.Module, name: str, reads: TensorReads) -> bool:
    parent_name, _, child = name.rpartition(".")
    return reads.reads(model.get_submodule(parent_name) if parent_name else model, child)


def output_head(model: nn.Module) -> str | None:
    """The name of the model's output head (``get_output_embeddings()``: ``lm_head``, BioGPT's
    ``output_projection``, GPT-NeoX's ``embed_out``), or None where it has none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # a base model without a head
        return None
    if not isinstance(head, nn.Module):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def context_limit(config: Any) -> int | None:
    """The most positions a model was made for (``config``: its config object, or config.json
    as a mapping): ``max_position_embeddings``, GPT-2's ``n_positions``; None where unknown."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    limit = get("max_position_embeddings") or get("n_positions")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"the model has no module named {name!r}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``; the old module's forward
    pre-hooks marked ``carried`` (an online rotation of its input) move to ``new``, and so does
    the mark of a layer whose checkpoints hold its weight as (in, out) (transformers' Conv1D,
    or a linear made from one: ``stored_transposed``), and the name of the ``nn.Linear``
    subclass with its own forward a layer was (Falcon's ``FalconLinear``: ``linear_class``)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module) and old is not new:
        if getattr(old, "stored_transposed", False) or type(old).__name__ == "Conv1D":
            new.stored_transposed = True
        subclass = isinstance(old, nn.Linear) and type(old).forward is not nn.Linear.forward
        if subclass or getattr(old, "linear_class", None):
            new.linear_class = getattr(old, "linear_class", None) or type(old).__name__
        for hook in old._forward_pre_hooks.values():
            if getattr(hook, "carried", False) and hook not in new._forward_pre_hooks.values():
                new.register_forward_pre_hook(hook)
    setattr(parent, child, new)


def untie_if_needed(model: nn.Module, quantized: set[str]) -> None:
    """Mark input/output embeddings untied when one side of the tie is now quantized."""
    config = getattr(model, "config", None)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    names = {k.removesuffix(".weight") for k in tied} | {
        v.removesuffix(".weight") for v in tied.values()
    }
    if names & quantized:
        config.tie_word_embeddings = False


def forward_logits(model: nn.Module, ids: Tensor | ModelInputs) -> Tensor:
    """Logits of a causal LM (HF models without the KV cache), or the main output of any other
    module called on ``ids`` (a tensor) or on :class:`ModelInputs` (a forward of several
    tensors): ``.logits``, a diffusers model's ``.sample``, or a tuple's first element. Inputs
    with timestep positions run one call per distinct position, each after ``select_step``
    (the layers' step is reset afterwards)."""
    if isinstance(ids, ModelInputs):
        extra = {"use_cache": False} if _takes_use_cache(model) else {}
        parts = []
        try:
            for position, index, part in ids.by_position():
                if position is not None:
                    select_step(model, position)
                parts.append((index, _main_output(part.call(model, **extra))))
        finally:
            if ids.positions is not None:
                select_step(model, None)
        if len(parts) == 1:
            return parts[0][1]
        out = torch.cat([o for _, o in parts])
        return out[torch.argsort(torch.cat([i for i, _ in parts]))]
    if _takes_use_cache(model):
        return _main_output(model(ids, use_cache=False))
    return _main_output(model(ids))


def _main_output(out: Any) -> Tensor:
    for attr in ("logits", "sample"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, tuple) else out


def _takes_use_cache(model: nn.Module) -> bool:
    """An HF language model (it has a ``config`` and its forward takes ``use_cache``); a
    diffusers model has a ``config`` too, but no cache."""
    if not hasattr(model, "config"):
        return False
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params)
