"""Mixture-of-experts layers as linear layers, so that every algorithm quantizes them.

transformers 5 holds the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek V2/V3, GLM-4-MoE
and some fifty other families as two 3-D parameters per block, ``gate_up_proj``
(experts, 2 x width, hidden) and ``down_proj`` (experts, hidden, width), and runs them in one
eager loop over the experts that the router picked. :func:`experts_to_linears` replaces such a
module by :class:`LinearExperts`: one :class:`ExpertMLP` per expert, with ``gate_proj``,
``up_proj`` and ``down_proj`` linears (views of the 3-D weights, no copy), under the names
transformers writes on disk (``mlp.experts.3.gate_proj.weight``), so a checkpoint streams
into them as it is. Each expert's linears then see only the tokens routed to them: GPTQ's
Hessians, AWQ's scales and the activation ranges are the expert's own, as in GPTQModel and
llm-compressor. Routers stay float: a linear of the block that scores the experts (``gate``,
``router.layer``; one output per expert) or the shared expert (``shared_expert_gate``, one
output) becomes a :class:`RouterLinear`, which the quantizer skips (a rounding error there
changes which experts run).

The replacement is checked on the model's tiny random twin (:mod:`lowbit.models.twin`): its
logits with the linears must equal its own to 1e-9 (float64), else the model is refused with
the reason, before any weight is read. Experts of another layout (DBRX's stacked 2-D
matrices, GPT-OSS's biased and interleaved ones) are refused by :func:`refuse_fused_experts`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.twin import tiny_twin, twin_logits
from lowbit.nn.kernel_experts import one_token_experts

TOLERANCE = 1e-9  # relative max error of the float64 twin's logits (the same products)
# modules whose weights lowbit quantizes, or keeps whole (an embedding)
KNOWN_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


class RouterLinear(nn.Linear):
    """A router's linear (scores of the experts): kept float by the quantizer (``keeps_float``:
    see :func:`lowbit.nn.linear_like.is_linear`)."""

    keeps_float = True


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))`` on the tokens routed to it."""

    def __init__(self, hidden: int, width: int, act_fn: nn.Module, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden, width, **kw)
        self.up_proj = nn.Linear(hidden, width, **kw)
        self.down_proj = nn.Linear(width, hidden, **kw)
        self.act_fn = act_fn
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            linear.lowbit_routed = True  # calibration may route no token here (not an error)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.Module):
    """The experts of one block as linears (children ``0`` … ``n-1``), computing what
    transformers' fused experts module computes: each picked expert's output on its tokens,
    scaled by the router's weight, summed into place."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if hidden_states.shape[0] == 1:  # a decoded token: its experts called directly
            return self._one_token(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # (experts + 1, top-k, tokens); index n marks a dropped slot
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == self.num_experts:
                continue
            slot, token = torch.where(mask[index])
            y = self._modules[str(index)](hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def _one_token(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """``forward`` for one token without the masks: its (expert, slot) pairs in ascending
        order, the order in which the loop above adds them (so the sum is bit-identical), the
        dropped index n skipped as there. 4-bit kernel experts take two native calls
        (:func:`lowbit.nn.kernel_experts.one_token_experts`, the same sum to the bit)."""
        picked = sorted((e, k) for k, e in enumerate(top_k_index[0].tolist()))
        picked = [(e, k) for e, k in picked if e != self.num_experts]
        experts = [self._modules[str(e)] for e, _ in picked]
        if picked and all(type(e) is ExpertMLP for e in experts):  # (their forward, vouched)
            route = top_k_weights[0, [k for _, k in picked]]
            fused = one_token_experts(experts, x, route)
            if fused is not None:
                return fused
        out = torch.zeros_like(x)
        for expert, (_, slot) in zip(experts, picked, strict=True):
            out += (expert(x) * top_k_weights[:, slot, None]).to(out.dtype)
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused layout: exactly ``gate_up_proj`` (E, 2I, H) and ``down_proj``
    (E, H, I), no bias, and an ``act_fn``."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    e, two_i, h = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


def experts_to_linears(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by :class:`LinearExperts` (in place,
    after the twin check) and mark its routers; returns the count. Experts lowbit cannot turn
    into linears are a one-line error (:func:`refuse_fused_experts`)."""
    fused = [name for name, m in model.named_modules() if is_fused_experts(m)]
    if fused:
        _check_on_twin(model)
        for name in fused:
            _replace(model, name)
    refuse_fused_experts(model)
    return len(fused)


def _replace(model: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    fused = getattr(parent, child)
    gate_up, down = fused.gate_up_proj, fused.down_proj
    e, two_i, h = gate_up.shape
    width = two_i // 2
    experts = []
    for i in range(e):  # built empty (meta), then given views of the 3-D weights if real
        expert = ExpertMLP(h, width, fused.act_fn, torch.device("meta"), gate_up.dtype)
        if not gate_up.is_meta:  # contiguous rows: no copy
            grad = gate_up.requires_grad
            expert.gate_proj.weight = nn.Parameter(gate_up.data[i, :width], requires_grad=grad)
            expert.up_proj.weight = nn.Parameter(gate_up.data[i, width:], requires_grad=grad)
            expert.down_proj.weight = nn.Parameter(down.data[i], requires_grad=grad)
        experts.append(expert)
    linears = LinearExperts(experts)
    setattr(parent, child, linears)
    inside = set(map(id, linears.modules()))
    for router in parent.modules():  # what scores the experts (or a shared one) from the input
        if id(router) in inside or not isinstance(router, nn.Linear):
            continue
        if router.in_features == h and router.out_features in (e, 1):
            if type(router) is nn.Linear:
                router.__class__ = RouterLinear  # same parameters and hooks, a type the plan skips
            else:  # a subclass keeps its own forward (Ergo's float32 logits), marked
                router.keeps_float = True


def _check_on_twin(model: nn.Module) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        twin = tiny_twin(model)
        want = twin_logits(twin)
        for name in [n for n, m in twin.named_modules() if is_fused_experts(m)]:
            _replace(twin, name)
        got = twin_logits(twin)
    except LowbitError as exc:
        raise LowbitError(
            f"{kind}: its experts cannot be checked as linear layers ({exc}); "
            f"lowbit does not quantize this mixture-of-experts model"
        ) from None
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not err <= TOLERANCE:
        raise LowbitError(f"{kind}: its experts do not compute what transformers' eager "
                          f"experts loop does (a tiny random twin's logits moved by {err:.1e}); "
                          f"lowbit does not quantize this mixture-of-experts model")  # fmt: skip


def _rules(*keys: str) -> list:
    """transformers' conversion rules under the first of ``keys`` that has any (as it looks
    them up: a class name such as ``GPTNeoXForCausalLM`` first, then the model type)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - an older transformers: names as stored
        return []
    for key in keys:
        rules = get_checkpoint_conversion_mapping(key) if key else None
        if rules is not None:
            return rules
    return []


def _stored_parts(rules: list) -> list[tuple[str, str, str]]:
    """(head, tail, part) per expert matrix of the rules that fuse experts in transformers:
    the stored name is head + index + tail (``.experts.`` 3 ``.w1.weight``), lowbit's part
    ``gate_proj`` (gate before up, as transformers concatenates them)."""
    out = []
    parts = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}
    for rule in rules:
        sources = list(getattr(rule, "source_patterns", None) or [])
        targets = list(getattr(rule, "target_patterns", None) or [])
        if len(targets) != 1 or not sources or not all(s.count("*") == 1 for s in sources):
            continue
        for suffix, names in parts.items():
            if targets[0].endswith(suffix) and len(sources) == len(names):
                for source, part in zip(sources, names, strict=True):
                    head, tail = source.split("*")
                    out.append((head, tail, part))
    return out


def checkpoint_renames(*keys: str) -> Callable[[str], str]:
    """The name under which lowbit's model holds a tensor that a checkpoint stores as
    ``name``: transformers' own renaming rules for the model's class or type (``keys``, as
    :func:`_rules` takes them; Mixtral's ``block_sparse_moe.`` is ``mlp.``, GPT-NeoX's
    ``embed_out.`` is ``lm_head.``), and its experts' per-expert names (Mixtral's
    ``experts.3.w1.weight``) as :class:`ExpertMLP` names them (``experts.3.gate_proj.weight``)."""
    rules = _rules(*keys)
    renames = [
        (re.compile(r.source_patterns[0]), r.target_patterns[0])
        for r in rules
        if type(r).__name__ == "WeightRenaming"
        and len(r.source_patterns) == len(r.target_patterns) == 1
    ]
    experts = [
        (re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$"), f"{head}\\1.{part}.weight")
        for head, tail, part in _stored_parts(rules)
    ]

    def rename(name: str) -> str:
        for pattern, new in renames:
            name = pattern.sub(new, name)
        for pattern, new in experts:
            name = pattern.sub(new, name)
        return name

    return rename


def stored_expert_names(model_type: str) -> Callable[[str], str]:
    """The other way, for writers of checkpoints that transformers loads: lowbit's expert
    linear ``mlp.experts.3.gate_proj`` (a module or tensor name) under the family's stored
    matrix name (Mixtral: ``mlp.experts.3.w1``, which transformers fuses on load)."""
    mapping = {part: tail.split(".")[1] for _, tail, part in _stored_parts(_rules(model_type))
               if tail.startswith(".") and tail.endswith(".weight")}  # fmt: skip
    pattern = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(?=\.|$)")

    def rename(name: str) -> str:
        return pattern.sub(lambda m: m.group(1) + mapping.get(m.group(2), m.group(2)), name)

    return rename


def refuse_fused_experts(model: nn.Module) -> None:
    """A one-line error for mixture-of-experts weights that are not linear layers (after
    :func:`experts_to_linears`): experts stacked as 2-D matrices (DBRX) or fused with biases
    and interleaved (GPT-OSS). lowbit quantizes linear layers, so those weights (most of such
    a model) would stay float while the report counted the linears only. A weight counts as an
    expert's when its path or its module's class names experts and no linear, convolution or
    embedding module holds it (a ViT's 3-D class token is none)."""
    fused = []
    for name, module in model.named_modules():
        if isinstance(module, KNOWN_LAYERS):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            path = f"{name}.{p_name}" if name else p_name
            expert = "expert" in type(module).__name__.lower() or any(
                "expert" in part for part in path.split("."))  # fmt: skip
            if p.dim() >= 2 and expert:
                fused.append((path, p.numel()))
    if not fused:
        return
    share = sum(n for _, n in fused) / sum(p.numel() for p in model.parameters())
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise LowbitError(f"{kind}: {len(fused)} expert weights are not linear layers "
                      f"({fused[0][0]}, ...: {share:.0%} of the parameters) nor in the layout "
                      f"lowbit turns into linears (Mixtral's, Qwen-MoE's); lowbit does not "
                      f"quantize this mixture-of-experts model")  # fmt: skip
