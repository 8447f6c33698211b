"""Per-family knowledge, kept as data: where the decoder blocks are, the order in which a block's
linears see their inputs (for true-sequential quantization), and which module feeds which
linears (for AWQ / SmoothQuant scale folding).

Names are relative to one decoder block. A family not listed here is traced instead (its blocks
found generically, its wiring derived by :mod:`lowbit.models.wiring`); these hand-written
mappings are overrides for the families whose wiring is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.linear_like import is_linear
from lowbit.nn.quant_linear import QuantLinear

# How a feeding module's output can absorb a per-channel division by s:
# "norm": weight (and bias) / s; "norm_plus_one": Gemma's (1 + weight) / s;
# "linear": rows (and bias) of the feeding linear / s (positively homogeneous path only).
PrevKind = Literal["norm", "norm_plus_one", "linear"]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of ``prev``; ``inspect`` is the module whose output measures
    the effect of scaling them (the attention or MLP sub-block, or the linear itself)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    prev_kind: PrevKind = "norm"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]


def _llama_like(name: str, types: tuple[str, ...], norm: PrevKind | None = "norm") -> Family:
    """Llama's block; ``norm=None`` for post-norm blocks (OLMo 2: the norms follow the
    attention and the MLP, so q/k/v and gate/up read the residual stream itself and only the
    linear pairs can absorb a scale)."""
    attn, mlp = "self_attn", "mlp"
    v_o = ScaleGroup(f"{attn}.v_proj", (f"{attn}.o_proj",), f"{attn}.o_proj", "linear")
    up_down = ScaleGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",), f"{mlp}.down_proj", "linear")
    groups = (v_o, up_down) if norm is None else (
        ScaleGroup("input_layernorm", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                   attn, norm),
        v_o,
        ScaleGroup("post_attention_layernorm", (f"{mlp}.gate_proj", f"{mlp}.up_proj"), mlp,
                   norm),
        up_down,
    )  # fmt: skip
    return Family(
        name,
        types,
        "model.layers",
        (
            (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
            (f"{attn}.o_proj",),
            (f"{mlp}.gate_proj", f"{mlp}.up_proj"),
            (f"{mlp}.down_proj",),
        ),
        groups,
    )


def families() -> tuple[Family, ...]:
    opt_attn = "self_attn"
    return (
        _llama_like("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3")),
        _llama_like("olmo2", ("olmo2",), norm=None),
        _llama_like("gemma", ("gemma",), norm="norm_plus_one"),
        Family(
            "opt",
            ("opt",),
            "model.decoder.layers",
            ((f"{opt_attn}.q_proj", f"{opt_attn}.k_proj", f"{opt_attn}.v_proj"),
             (f"{opt_attn}.out_proj",), ("fc1",), ("fc2",)),
            (
                ScaleGroup("self_attn_layer_norm",
                           (f"{opt_attn}.q_proj", f"{opt_attn}.k_proj", f"{opt_attn}.v_proj"),
                           opt_attn),
                ScaleGroup(f"{opt_attn}.v_proj", (f"{opt_attn}.out_proj",), f"{opt_attn}.out_proj",
                           "linear"),
                ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
                ScaleGroup("fc1", ("fc2",), "fc2", "linear"),  # ReLU is positively homogeneous
            ),
        ),
        Family(
            "gpt2",
            ("gpt2",),
            "transformer.h",
            (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
            (  # c_fc -> GELU -> c_proj cannot absorb a scale; c_attn's output mixes q, k, v
                ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
                ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
            ),
        ),
    )  # fmt: skip


def family_of(model: nn.Module) -> Family | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in families() if model_type in f.model_types), None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the model's repeated decoder blocks.

    Known families name the path; otherwise the largest ``nn.ModuleList`` of two or more modules
    of one class that contain linear layers (float, or a loaded folder's quantized ones) is
    taken.
    """
    family = family_of(model)
    if family is not None:
        try:
            blocks = model.get_submodule(family.blocks)
        except AttributeError:
            blocks = None
        if isinstance(blocks, nn.ModuleList):
            return family.blocks, blocks
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        has_linear = any(isinstance(m, (nn.Linear, QuantLinear)) for m in module[0].modules())
        if len(kinds) == 1 and has_linear:
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, name, module))
    if not candidates:
        top = ", ".join(f"{n}: {type(m).__name__}" for n, m in model.named_children()) or "nothing"
        raise LowbitError(
            "no repeated decoder blocks found (a ModuleList of identical blocks with linear "
            f"layers); the model's top-level modules are {top}"
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def block_linears(block: nn.Module) -> list[str]:
    """Names (relative to the block) of its linear layers (:func:`is_linear`), in definition
    order."""
    return [n for n, m in block.named_modules() if is_linear(m)]


def sequential_groups(block: nn.Module, family: Family | None,
                      true_sequential: bool) -> list[list[str]]:  # fmt: skip
    """The block's linears in the groups they are quantized in.

    With ``true_sequential`` and a family (known, or derived by tracing the block: see
    :mod:`lowbit.models.wiring`), the order in which the block reads them (q/k/v, then o, then
    gate/up, then down); otherwise one group with every linear. Linears the family does not list
    (or lists but the block lacks) are handled in a last group.
    """
    names = block_linears(block)
    if not true_sequential or family is None:
        return [names]
    groups, seen = [], set()
    for group in family.sequential:
        present = [n for n in group if n in names and n not in seen]
        if present:
            groups.append(present)
            seen.update(present)
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])
