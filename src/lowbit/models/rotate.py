"""Which tensors of a decoder a rotation changes, and how (:mod:`lowbit.algorithms.rotate`).

A :class:`Rotator` maps each tensor name to its rotated value, computed from the float
tensors it depends on (a linear and the norm folded into it), so the same rule serves a model
in memory (:func:`rotate_model`) and a checkpoint streamed block by block
(:class:`lowbit.models.rotate_source.RotatedSource`, which the streaming runner reads
like any source). The output head
of a tied model becomes its own tensor: it absorbs the final norm, the embedding does not.
Decoders that also normalise their sub-blocks' outputs (Gemma 2/3, GLM-4, OLMo 2) keep those
norms and turn their outputs at run time (:func:`install_online_rotations`); a mixture's
experts, routers and shared experts are turned as a dense MLP's linears are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.algorithms.rotate import (
    RotateOptions,
    head_columns,
    head_rows,
    keep_mean,
    orthogonal,
    reads,
    stream_signs,
    writes,
)
from lowbit.errors import LowbitError
from lowbit.models.experts import experts_to_linears
from lowbit.models.families import family_of, find_blocks
from lowbit.models.normalize import conv1d_to_linear
from lowbit.models.rotate_fit import (
    LAYERNORM,
    ROTATABLE,
    check_layernorm,
    llama_shape,
    mlp_parts,
    name_of,
    norm_layout,
)
from lowbit.models.source import tied_names, untie_head
from lowbit.models.twin import tiny_twin, twin_logits
from lowbit.nn.online import install_online, install_stream
from lowbit.primitives.hadamard import has_hadamard, online_block, online_matrix

TWIN_TOLERANCE = 1e-4  # relative max change of the twin's logits (rotated in float32)
Getter = Callable[[str], Tensor]
log = logging.getLogger(__name__)


class Rotator:
    """The rotated value of every tensor a rotation of ``model`` (a skeleton will do) changes;
    ``q``: the residual stream's matrix when it was chosen elsewhere (a learned one);
    ``heads``: one head-size matrix per block for the values and o_proj (learned ones,
    SpinQuant's R2; (blocks, head size, head size)) in place of the one shared matrix."""

    def __init__(self, model: nn.Module, options: RotateOptions, q: Tensor | None = None,
                 heads: Tensor | None = None, offset: float | None = None) -> None:  # fmt: skip
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None)
        known = kind in ROTATABLE or kind in LAYERNORM
        why = "" if known else llama_shape(model)
        if why:
            names = ", ".join((*ROTATABLE, *LAYERNORM))
            raise LowbitError(f"rotate: folding a rotation needs decoders that normalise the "
                              f"stream only before their linears ({names}, or blocks of a "
                              f"Llama's parts); {kind!r} is not one{why}; quantize it without "
                              f"rotate")  # fmt: skip
        # Gemma 2/3: the stream's matrix also turns the post-norms' outputs at run time
        self.post = bool(norm_layout(find_blocks(model)[1][0])[1])
        if self.post and (options.kind != "hadamard" or q is not None):
            raise LowbitError(f"rotate: {kind!r} normalises its sub-blocks' outputs, so the "
                              f"stream's matrix turns them at run time, fast for a Hadamard "
                              f"matrix only: use kind hadamard (its own seeded matrix), not "
                              f"{'a given matrix' if q is not None else options.kind}")  # fmt: skip
        family = family_of(model)
        groups = family.scale_groups if family is not None else ()
        plus_one = any(g.prev_kind == "norm_plus_one" for g in groups)
        # the norm's scale is offset + w; for a family lowbit does not name, the twin finds it
        self.offset = offset if offset is not None else 1.0 if plus_one else 0.0
        self.layernorm = LAYERNORM.get(kind)
        if self.layernorm is not None:
            check_layernorm(config, options)
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        self.latent = getattr(config, "kv_lora_rank", None) is not None  # DeepSeek's attention
        if self.latent:  # the values' head size (head_dim is the rotary part's)
            head_dim = config.v_head_dim
        if self.post:
            online_block(hidden)  # no transform of that width: an error here
        for n, what in ((hidden, "hidden size"), (head_dim, "head size")):
            if (
                options.kind == "hadamard"
                and not has_hadamard(n)
                and (n == hidden or options.heads)
            ):
                raise LowbitError(f"rotate: no Hadamard matrix of the {what} {n}; use kind: "
                                  f"random")  # fmt: skip
        if q is not None and q.shape != (hidden, hidden):
            raise LowbitError(f"rotate: the matrix is {tuple(q.shape)}, the hidden size "
                              f"{hidden}")  # fmt: skip
        self._given, self._options, self._hidden, self._config = q, options, hidden, config
        self.h = orthogonal(head_dim, options) if options.heads else None
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.kv_rows = kv_heads * head_dim  # v_proj's rows (inside a fused qkv_proj)
        self.heads = None if heads is None else heads.double()
        if self.heads is not None:
            shape = (len(find_blocks(model)[1]), head_dim, head_dim)
            if self.h is None or self.heads.shape != shape:
                raise LowbitError(f"rotate: per-block head matrices {tuple(self.heads.shape)} "
                                  f"need heads: true and shape {shape}")  # fmt: skip
        # every down_proj's input turned at run time (install_online); its weight gets W·H.
        # The dense matrix of each width is built on first use (they are large: 1.6 GB of
        # float64 at width 14336), so a fit check (fitted_rotation) costs nothing
        self._online: dict[int, Tensor] = {}
        self.online_dtype, self.online_device = torch.float64, torch.device("cpu")
        self.ops: dict[str, tuple] = {}
        self.aliases: dict[str, str] = {}  # a tied head: read from the embedding
        self.stored_t = _stored_transposed(model)  # GPT-2's Conv1D weights: (in, out) on disk
        self._plan(model)
        for width in sorted({op[2] for op in self.ops.values() if op[0] == "writes" and op[2]}):
            online_block(width)  # no transform of that width: an error here
        if not known and offset is None:
            self.offset = _twin_offset(model, options)

    def _plan(self, model: nn.Module) -> None:
        prefix, blocks = find_blocks(model)
        ops = self.ops
        if self.layernorm is not None:
            self._plan_layernorm(model, prefix, blocks)
            self._plan_ends(model, prefix, f"{prefix.rpartition('.')[0]}.{self.layernorm[1]}")
            return
        stream = not self.post  # o_proj and down_proj write to the turned stream
        for i, block in enumerate(blocks):
            b = f"{prefix}.{i}."
            attn, mlp = f"{b}self_attn.", f"{b}mlp."
            pre = norm_layout(block)[0] or (None, None)  # none: the stream itself is read
            n1, n2 = (None if n is None else f"{b}{n}.weight" for n in pre)
            for norm in (n1, n2):
                if norm is not None:
                    ops[norm] = ("unit",)
            head = i if self.h is not None else None  # which block's head matrix, if any
            if hasattr(block.self_attn, "qkv_proj"):  # Phi-3: q, k, v rows in one weight
                ops[f"{attn}qkv_proj.weight"] = ("reads", f"{attn}qkv_proj.weight", n1, head)
            elif self.latent:  # the values come out of kv_b_proj, which reads no stream
                for name in ("q_a_proj", "q_proj", "kv_a_proj_with_mqa"):
                    if isinstance(getattr(block.self_attn, name, None), nn.Module):
                        ops[f"{attn}{name}.weight"] = ("reads", f"{attn}{name}.weight", n1, None)
                if head is not None:
                    ops[f"{attn}kv_b_proj.weight"] = ("latent_values", head)
            else:
                for name in ("q_proj", "k_proj"):
                    ops[f"{attn}{name}.weight"] = ("reads", f"{attn}{name}.weight", n1, None)
                ops[f"{attn}v_proj.weight"] = ("reads", f"{attn}v_proj.weight", n1, head)
            if stream or head is not None:
                ops[f"{attn}o_proj.weight"] = ("writes", head, None, stream)
            readers, writers = mlp_parts(block.mlp)  # a mixture's experts and routers too
            for name in readers:
                ops[f"{mlp}{name}"] = ("reads", f"{mlp}{name}", n2, None)
            for name, width in writers:
                if stream or self._options.online:
                    online = width if self._options.online else None
                    ops[f"{mlp}{name}"] = ("writes", None, online, stream)
            self._biases(block, b, i, stream)
        self._plan_ends(model, prefix, _final_norm(model, prefix))

    def _plan_layernorm(self, model: nn.Module, prefix: str, blocks: nn.ModuleList) -> None:
        family, ops = family_of(model), self.ops
        norms = [(g.prev, g.linears) for g in family.scale_groups if g.prev_kind == "norm"]
        values = norms[0][1][-1]  # v_proj, or the fused q/k/v layer
        outs = (family.sequential[1][0], family.sequential[3][0])  # attention's, the MLP's
        for i, block in enumerate(blocks):
            b = f"{prefix}.{i}."

            def has_bias(layer: str, block: nn.Module = block) -> bool:
                return isinstance(getattr(block.get_submodule(layer), "bias", None), Tensor)

            head = i if self.h is not None else None
            for norm, readers in norms:
                w, beta = f"{b}{norm}.weight", f"{b}{norm}.bias"
                ops[w], ops[beta] = ("unit",), ("zero",)
                for r in readers:
                    turn = head if r == values else None
                    ops[f"{b}{r}.weight"] = ("reads", f"{b}{r}.weight", w, turn)
                    if not has_bias(r):
                        raise LowbitError(f"rotate: {b}{r} has no bias to take {norm}'s")
                    ops[f"{b}{r}.bias"] = ("reads_bias", f"{b}{r}", beta, turn)
            for out, turn in zip(outs, (head, None), strict=True):
                ops[f"{b}{out}.weight"] = ("writes", turn, None, True)
                if has_bias(out):
                    ops[f"{b}{out}.bias"] = ("writes_bias",)
        positions = f"{prefix.rpartition('.')[0]}.{self.layernorm[0]}.weight"
        ops[positions] = ("reads", positions, None, None)

    def _plan_ends(self, model: nn.Module, prefix: str, norm: str) -> None:
        ops = self.ops
        embed = name_of(model, model.get_input_embeddings())
        head = name_of(model, model.get_output_embeddings())
        ops[f"{embed}.weight"] = ("reads", f"{embed}.weight", None, None)
        ops[f"{norm}.weight"] = ("unit",)
        if self.layernorm is not None:
            ops[f"{norm}.bias"] = ("final_bias", norm)
        source = f"{embed}.weight" if tied_names(model) else f"{head}.weight"
        ops[f"{head}.weight"] = ("reads", source, f"{norm}.weight", None)
        self.ends = {"embed": f"{embed}.weight", "head": f"{head}.weight",
                     "norm": f"{norm}.weight"}  # fmt: skip
        if source != f"{head}.weight":
            self.aliases[f"{head}.weight"] = source

    def _biases(self, block: nn.Module, b: str, i: int, stream: bool) -> None:
        for name, module in block.named_modules():
            bias = getattr(module, "bias", None)
            if not isinstance(bias, Tensor) or not isinstance(module, nn.Linear):
                continue
            key = f"{b}{name}.bias"
            if name.endswith(("o_proj", "down_proj")):
                if stream:
                    self.ops[key] = ("writes_bias",)
            elif name.endswith("v_proj") and self.h is not None:
                self.ops[key] = ("head_bias", i)
        for name, module in block.named_modules():
            if name.endswith("layernorm") and isinstance(getattr(module, "bias", None), Tensor):
                raise LowbitError(f"rotate: {b}{name} has a bias; only RMSNorm folds")

    @functools.cached_property
    def q(self) -> Tensor:
        """The residual stream's (hidden, hidden) float64 matrix, built on first use (a fit
        check, :func:`fitted_rotation`, builds none): the given one, or ``orthogonal``'s."""
        if self._given is None and self._options.kind == "learned":
            raise LowbitError("rotate: kind learned needs its trained matrix (quantize learns "
                              "it on the calibration text first)")  # fmt: skip
        given = self._given
        q = orthogonal(self._hidden, self._options, self.post) if given is None else given.double()
        return keep_mean(q) if self.layernorm is not None else q

    def online(self, width: int) -> Tensor:
        """The dense matrix of a ``width``-wide down_proj input's online transform (its weight
        gets W·H), in ``online_dtype`` on ``online_device`` (float64 on the CPU when folding)."""
        if width not in self._online:
            m = online_matrix(width)
            self._online[width] = m.to(self.online_device, self.online_dtype)
        return self._online[width]

    def _head_rows(self, t: Tensor, block: int, layer: str) -> Tensor:
        """The values' rows (or bias) of ``t`` turned by the block's head matrix: all of
        v_proj's, the last kv_rows of a fused q/k/v layer's (Phi-3, GPT-2)."""
        if layer.removesuffix(".weight").rpartition(".")[2] == "v_proj":
            return head_rows(t, self.head(block))
        v = t.shape[0] - self.kv_rows
        return torch.cat([t[:v], head_rows(t[v:], self.head(block))])

    def _latent_values(self, w: Tensor, block: int) -> Tensor:
        """kv_b_proj's weight with each head's value rows (after its qk_nope_head_dim key
        rows) turned by the block's head matrix, as v_proj's are."""
        heads = self._config.num_attention_heads
        nope = self._config.qk_nope_head_dim
        per = w.reshape(heads, -1, w.shape[-1])  # (heads, nope + v, rank)
        values = head_rows(per[:, nope:].reshape(-1, w.shape[-1]), self.head(block))
        values = values.reshape(heads, -1, w.shape[-1])
        return torch.cat([per[:, :nope], values], 1).reshape(w.shape)

    def head(self, block: int) -> Tensor:
        """The head-size matrix of block ``block``'s values and o_proj."""
        return self.h if self.heads is None else self.heads[block]

    def tensor(self, name: str, get: Getter) -> Tensor:
        """The rotated float32 value of ``name``; ``get`` reads a float32 tensor by name."""
        op = self.ops[name]
        if op[0] == "unit":  # a norm whose scale was folded: 1 (Gemma's w = 0)
            return torch.full_like(get(name), 1.0 - self.offset)
        if op[0] == "zero":  # a LayerNorm's bias, folded into its readers' biases
            return torch.zeros_like(get(name))
        if op[0] == "reads_bias":  # b + W·β, in the head order of the weight's rows
            _, layer, beta, block = op
            w = get(f"{layer}.weight").double()
            b = (get(name).double() + w @ get(beta).double()).float()
            return b if block is None else self._head_rows(b, block, layer)
        if op[0] == "final_bias":  # the head's share of the final norm's bias: (β/g)·Q
            g, beta = get(f"{op[1]}.weight").double(), get(name).double()
            if bool((g == 0).any()):
                raise LowbitError(f"rotate: {op[1]} has a zero scale; its bias cannot be kept "
                                  f"for the head")  # fmt: skip
            return ((beta / g) @ self.q).float()
        if op[0] == "reads":
            _, source, norm, block = op
            w = reads(get(source), self.q, None if norm is None else get(norm) + self.offset)
            return w if block is None else self._head_rows(w, block, source)
        if op[0] == "writes":  # (its head matrix, its online width, the stream turned)
            w = get(name)
            w = w if op[1] is None else head_columns(w, self.head(op[1]))
            w = writes(w, self.q) if op[3] else w
            return reads(w, self.online(op[2])) if op[2] else w
        if op[0] == "writes_bias":
            return writes(get(name).unsqueeze(1), self.q).squeeze(1)
        if op[0] == "latent_values":  # kv_b_proj's rows per head: the keys' part, the values'
            return self._latent_values(get(name), op[1])
        return head_rows(get(name), self.head(op[1]))  # head_bias


def fitted_rotation(options: RotateOptions | None, model: nn.Module) -> RotateOptions | None:
    """``options`` as ``model`` can take them: with ``if_possible``, without the online part
    or without any rotation where those are in the way (logged); else unchanged (a rotation
    the model cannot take stays an error, raised where it is applied)."""
    if options is None or not options.if_possible:
        return options
    tries = [options] + ([dataclasses.replace(options, online=())] if options.online else [])
    reason = ""
    for fit in tries:
        try:
            Rotator(model, fit)  # checks and plans; builds no matrix
        except LowbitError as exc:
            reason = reason or str(exc).removesuffix("; quantize it without rotate")
            continue
        if fit is not options:
            log.warning("rotate without its online part (the recipe's if_possible): %s", reason)
        return fit
    log.warning("rotate skipped (the recipe's if_possible): %s", reason)
    return None


def install_online_rotations(model: nn.Module, options: RotateOptions | None) -> None:
    """Turn the inputs ``options.online`` names at run time (every block's ``down_proj``),
    matching weights a :class:`Rotator` folded (a loaded folder: its recipe's options)."""
    if options is None:
        return
    _, blocks = find_blocks(model)
    if norm_layout(blocks[0])[1]:  # the post-norms' outputs, by the stream's matrix
        signs = stream_signs(model.config.hidden_size, options)
        for block in blocks:
            for norm in norm_layout(block)[1]:
                install_stream(getattr(block, norm), signs)
    if not options.online:
        return
    for block in blocks:  # a dense MLP's down_proj, or every expert's and the shared one's
        for name, module in block.mlp.named_modules():
            if name.rpartition(".")[2] == "down_proj":
                install_online(module, module.in_features)


@torch.no_grad()
def rotate_model(model: nn.Module, options: RotateOptions, q: Tensor | None = None,
                 heads: Tensor | None = None) -> None:  # fmt: skip
    """Rotate a model held in memory (its tensors replaced; the function it computes kept),
    with its online rotations installed; ``q`` and ``heads`` as for :class:`Rotator`."""
    experts_to_linears(model)  # a mixture's experts: linears the plan turns one by one
    _apply(model, Rotator(model, options, q, heads), options)  # checks before anything changes


@torch.no_grad()
def _apply(model: nn.Module, rotator: Rotator, options: RotateOptions) -> None:
    rotator.q  # noqa: B018 - built now: a learned kind without its matrix fails here
    conv1d_to_linear(model)  # (out, in) weights, as the rotation reads them
    install_online_rotations(model, options)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    new = {name: rotator.tensor(name, state.__getitem__) for name in rotator.ops}
    untie_head(model)
    for name, value in new.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(value.to(old.dtype), requires_grad=False))


def _stored_transposed(model: nn.Module) -> set[str]:
    """Weights a checkpoint holds as (in, out): transformers' Conv1D (GPT-2), or the linears
    made from them (:func:`lowbit.models.normalize.conv1d_to_linear`)."""
    from transformers.pytorch_utils import Conv1D

    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, Conv1D) or getattr(module, "stored_transposed", False)
    }


def _twin_offset(model: nn.Module, options: RotateOptions) -> float:
    """The norms' scale offset (0: x·w, 1: x·(1 + w)) with which ``options``' rotation leaves a
    tiny random twin of ``model`` computing the same logits; an error when neither does."""
    kind = model.config.model_type
    kind_ = "random" if options.kind == "learned" else options.kind  # the plan is the same
    probe = dataclasses.replace(options, kind=kind_)
    worst = float("inf")
    try:
        for offset in (0.0, 1.0):
            twin = tiny_twin(model)
            experts_to_linears(twin)  # as the model's (the same function, checked there)
            before = twin_logits(twin)
            _apply(twin, Rotator(twin, probe, offset=offset), probe)
            after = twin_logits(twin)
            change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
            if change < TWIN_TOLERANCE:
                return offset
            worst = min(worst, change)
    except LowbitError as exc:
        raise LowbitError(f"rotate: {kind!r} is not a family lowbit names, and the rotation "
                          f"could not be checked on a small model of it: {exc}; quantize it "
                          f"without rotate") from None  # fmt: skip
    raise LowbitError(f"rotate: folding the rotation into a small {kind!r} changed its logits "
                      f"({worst:.1e} relative): its blocks compute more than a Llama's; "
                      f"quantize it without rotate")  # fmt: skip


def _final_norm(model: nn.Module, prefix: str) -> str:
    parent = prefix.rpartition(".")[0]
    name = f"{parent}.norm" if parent else "norm"
    try:
        model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"rotate: no final norm at {name}") from None
    return name
