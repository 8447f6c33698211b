"""A decoded token's mixture block in one native call, router included.

For a block of a family whose forward is its top-k router, then its experts
(transformers' ``OlmoeSparseMoeBlock``, ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``:
logits = h·Wᵀ, softmax, top k, renormalised where the router says so), with SiLU experts on
4-bit kernel layers (:func:`lowbit.nn.kernel_experts.one_token_experts`' conditions),
:func:`mixture_step` returns a :class:`NativeMixture`, a function of one token's hidden state
that runs ``lowbit_cpu::mixture_step``: the router's ATen ops and both expert calls without
going back to Python (OLMoE's shape: ~270 us of Python per block, a seventh of a decode step),
on the block's tensors held once in C++ (``held``, which the one-call decode step
``lowbit_cpu::decode_step`` takes too). Before it is used it is checked on a random token
against the block itself, to the bit; a block it cannot take, or that disagrees, keeps its own
forward (None). Like the decode loop's other native calls it reads the weights it found when it
was built; hooks registered later on the block, its router, its experts or their layers and
activations, global hooks, or training mode (``unplain()``) send the token through the block's
forward instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.kernels.affine import AffineWeight, experts_fit
from lowbit.kernels.build import native_ops
from lowbit.models.experts import ExpertMLP, LinearExperts
from lowbit.nn.kernel_experts import affine_only, global_hooks

log = logging.getLogger(__name__)

# block -> its router's class, whose forward is softmax top-k (renormalised where its
# ``norm_topk_prob`` is true, always for Mixtral's)
ROUTERS = {
    "OlmoeSparseMoeBlock": "OlmoeTopKRouter",
    "MixtralSparseMoeBlock": "MixtralTopKRouter",
    "Qwen3MoeSparseMoeBlock": "Qwen3MoeTopKRouter",
}


@dataclass(frozen=True, eq=False)  # (compared and hashed as itself)
class NativeMixture:
    """``step(h)`` for h (B, hidden) float32 decode rows: the block's output for each token
    (the native call takes the rows one by one, each as it would alone). Callers send it up
    to ``rows`` rows: while the rows' picks (B·k) do not outnumber the experts (E), reading
    each row's experts reads no more than their union might, without the block's Python loop
    over experts; past that the block's own batched forward, which reads each picked expert
    once. (OLMoE's shape, 64 experts, 8 a token, W4, 2 cores, tokens/s of the batch against
    the batched block's: 2, 4 and 8 rows x1.84, x1.32, x1.50; 16 x1.28, 32 x0.71.)"""

    held: torch.ScriptObject  # lowbit_cpu.MixtureBlock: the router, top k, experts
    block: nn.Module
    unplain: Callable[[], bool]  # hooks or training: the block's own forward
    rows: int  # E // k, at least 1

    def __call__(self, h: Tensor) -> Tensor:
        if self.unplain():
            return self.block(h[None]).reshape(h.shape)
        return torch.ops.lowbit_cpu.mixture_step(h, self.held)


def mixture_step(block: nn.Module) -> NativeMixture | None:
    """The block's native step, equal to calling the block to the bit; None where the native
    call does not apply."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    router = None if gate is None else getattr(gate, "weight", None)
    if not (native_ops() and ROUTERS.get(type(block).__name__) == type(gate).__name__
            and isinstance(experts, LinearExperts) and isinstance(router, Tensor)
            and router.dtype == torch.float32 and router.dim() == 2
            and router.shape[0] == experts.num_experts):  # fmt: skip
        return None
    mlps = [experts._modules[str(e)] for e in range(experts.num_experts)]
    if not all(type(e) is ExpertMLP and _silu(e.act_fn) for e in mlps):
        return None
    if not 1 <= gate.top_k <= experts.num_experts:
        return None
    # every module the block's forward calls: a hook on any of them, now or added later (their
    # dicts, checked at every token in ~4 us for OLMoE's 64 experts), sends the token there
    parts = [m for e in mlps for m in (e, e.gate_proj, e.up_proj, e.down_proj, e.act_fn)]
    hooks = tuple(d for m in (block, gate, experts, *parts)
                  for d in (m._forward_hooks, m._forward_pre_hooks))  # fmt: skip

    def unplain() -> bool:  # hooks, or training: the block's own forward
        return global_hooks() or any(hooks) or block.training

    if unplain():
        return None
    weights = [[affine_only(getattr(e, name)) for e in mlps]
               for name in ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
    if any(aw is None for part in weights for aw in part):
        return None
    ups, downs = weights[0] + weights[1], weights[2]
    if not (experts_fit(ups, router.shape[1]) and experts_fit(downs, ups[0].w.shape[0])):
        return None
    held = _held(router, gate.top_k, _renormalises(gate), ups + downs, downs[0].group)
    step = NativeMixture(held, block, unplain, max(1, experts.num_experts // gate.top_k))
    probe = torch.randn(1, router.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            agrees = torch.equal(step(probe), block(probe[None]).reshape(1, -1))
    except RuntimeError as exc:  # an argument the op refuses: the block keeps its forward
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.info("%s: the native mixture step refused the block (%s); the block runs it",
                 type(block).__name__, first)  # fmt: skip
        return None
    if not agrees:
        log.info("%s: the native mixture step disagrees with the block; the block runs it",
                 type(block).__name__)  # fmt: skip
        return None
    return step


def _silu(act: nn.Module) -> bool:
    """torch's SiLU module or transformers' (``F.silu``)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _renormalises(gate: nn.Module) -> bool:
    return type(gate).__name__ == "MixtralTopKRouter" or bool(gate.norm_topk_prob)


def _held(router: Tensor, top_k: int, norm: bool, aws: list[AffineWeight], group_down: int):
    """The block's tensors held once in C++ (converting its 9E tensors at every call cost ~6%
    of an OLMoE decode step)."""
    w, scale, offset = ([getattr(aw, k) for aw in aws] for k in ("w", "scale", "offset"))
    return torch.classes.lowbit_cpu.MixtureBlock(
        router, top_k, norm, w, scale, offset, aws[0].group, group_down
    )
