"""A compact forward for Llama-like decoders (Llama, Mistral, Qwen2, Qwen3, Phi-3, and others
whose tiny twin shows the same arithmetic: :mod:`lowbit.runtime.llama_twin`, post-norm blocks
such as OLMo 2's included) over a static cache.

Why not the model's own forward: at decode a small model spends most of each token in the
framework around the matmuls (mask and position bookkeeping, cache objects, hundreds of small
module calls). This forward does the same arithmetic with a few tensor ops per layer: fused
RMSNorm, one kernel call for q/k/v and one for gate/up where the layers share a fused weight
(:mod:`lowbit.nn.shared_input`), a cos/sin table computed once, one attention call. It calls the
model's own linear modules (float, QuantLinear or kernel modules), so every format runs on it;
the logits equal the model's to float32 rounding (a CI test on every family it accepts). A
mixture of experts' block (its experts as linears) is called as the model's own module, inside
the compact attention and norms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels import decode as decode_ops
from lowbit.kernels.affine import GEMV_MAX_ROWS
from lowbit.kernels.build import native_ops
from lowbit.kernels.decode import add_rms_norm, decode_attention, rms_norm, rope_qk, silu_mul
from lowbit.kernels.kv_attention import decode_attention_codes
from lowbit.kernels.threads import torch_ops_on_one_thread
from lowbit.models.experts import LinearExperts
from lowbit.models.kernels import pooled_layers
from lowbit.models.mixture_step import NativeMixture, mixture_step
from lowbit.nn.attention import ATTRIBUTE, head_rotation, key_center, round_qkv
from lowbit.runtime.hf_forward import longrope_switch
from lowbit.runtime.kv_cache import QuantKVCache, StaticKVCache
from lowbit.runtime.layer_calls import (
    Native,
    direct,
    direct_group,
    joint,
    online_call,
    prompt_call,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # Phi-3: fused q/k/v and gate/up


def capacity_reason(model: nn.Module, capacity: int) -> str | None:
    """Why this forward cannot run a Llama-like ``model`` up to ``capacity`` tokens: the
    settings of its config that it does not follow (or follows only so far)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    rope = rope_parameters.get("rope_type", "default")
    if rope == "dynamic":
        return "dynamic RoPE scaling changes with the context length"
    original = longrope_switch(config) or 0  # (0: LongRoPE without its original length)
    if rope == "longrope" and capacity > original:  # its factors switch past `original`
        return f"LongRoPE changes its factors past {original} tokens"
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        return "RoPE on part of each head"
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2's switch: set but unused
        window = None
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    # a window on every layer without layer_types (a family it does not name: assumed so)
    every = kind in ("mistral", "phi3") or kind not in FAMILIES
    if window and (types != {"full_attention"} or every) and capacity > window:
        return f"a sliding attention window of {window} tokens is shorter than {capacity}"
    if getattr(config, "mlp_bias", False) or getattr(config, "pretraining_tp", 1) != 1:
        return "MLP biases or tensor-parallel slicing"
    if getattr(config, "clip_qkv", None) is not None:  # (a twin's small values never reach it)
        return "queries, keys and values clipped"
    return None


@dataclass
class _Layer:
    norm1: nn.Module | None  # None: a post-norm block (see post)
    qkv: Callable[[Tensor], Tensor]  # (..., C) -> (..., (H + 2·Hkv)·D)
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: Callable[[Tensor], Tensor]  # the module, or prompt_call's call
    norm2: nn.Module | None
    gate_up: Callable[[Tensor], Tensor]  # (..., C) -> (..., 2·I)
    act: Callable[[Tensor], Tensor] | None  # None: SiLU (the fused silu_mul)
    down: Callable[[Tensor], Tensor]
    key_center: Tensor | None = None  # (Hkv, D) subtracted before the cache (center_keys)
    fast: tuple = ()  # decode: (qkv, o_proj, gate_up, down) on 2-D inputs, see direct
    moe: Callable[[Tensor], Tensor] | None = None  # a mixture's MLP, in place of gate_up/down
    whole: tuple[nn.Module, nn.Module] | None = None  # q/k norms over all heads (OLMoE's)
    mixture: NativeMixture | None = None  # moe's one-token native call, where there is one
    # a post-norm block (OLMo 2): the norms of the attention's and the MLP's outputs, each
    # applied before its residual add, in place of norm1 and norm2 on their inputs
    post: tuple[nn.Module, nn.Module] | None = None


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    return rms_norm(x, norm.weight, _eps(norm))


def _pre(norm: nn.Module | None, x: Tensor) -> Tensor:
    """A pre-norm block's input norm (a post-norm block has none)."""
    return x if norm is None else _rms(norm, x)


def _post(layer: _Layer, i: int, y: Tensor) -> Tensor:
    """A post-norm block's norm of its attention's (i = 0) or MLP's (i = 1) output."""
    return y if layer.post is None else _rms(layer.post[i], y.contiguous())


def is_post_norm(block: nn.Module) -> bool:
    """Whether a decoder block is post-norm (OLMo 2's: no input_layernorm; its
    post_attention_layernorm and post_feedforward_layernorm norm the sublayers' outputs)."""
    return not hasattr(block, "input_layernorm") and hasattr(block, "post_feedforward_layernorm")


def _norms(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None, tuple | None]:
    """(input norm, MLP's input norm, post norms) of a pre-norm (Llama) or post-norm block."""
    if is_post_norm(block):
        return None, None, (block.post_attention_layernorm, block.post_feedforward_layernorm)
    return block.input_layernorm, block.post_attention_layernorm, None


class LlamaForward:
    """``forward(ids, cache)``: logits of the last position (or all), filling ``cache``."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        inner = self.inner = model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        silu = getattr(cfg, "hidden_act", None) == "silu"
        native = native_ops() and self.embed.weight.dtype == torch.float32
        self.layers = [self._layer(block, silu, native) for block in inner.layers]
        self._pooled = native and pooled_layers(model)
        for layer in self.layers:  # q/k norms over all heads at once: applied before RoPE
            if layer.q_norm is not None and layer.q_norm.weight.numel() != self.head_dim:
                layer.whole, layer.q_norm, layer.k_norm = (layer.q_norm, layer.k_norm), None, None
        self.fast_head = online_call(self.head) if native else self.head
        self.scaling = inner.layers[0].self_attn.scaling
        self.cos = self.sin = torch.empty(0, self.head_dim)  # (T, D), grown by new_cache
        # rounded attention inputs (lowbit.nn.attention): a quantized cache, rotated heads
        self.attention = getattr(inner.layers[0].self_attn, ATTRIBUTE, None)
        self.rotation = None if self.attention is None else head_rotation(
            self.attention, self.head_dim, torch.empty(0))  # fmt: skip
        self.turn = torch.empty(0) if self.rotation is None else self.rotation  # (D, D) or none
        if self.attention is not None:
            for layer, block in zip(self.layers, inner.layers, strict=True):
                layer.key_center = key_center(block.self_attn, self.attention)

    @staticmethod
    def _layer(block: nn.Module, silu: bool, native: bool) -> _Layer:
        attn, mlp = block.self_attn, block.mlp
        qkv = (
            [attn.qkv_proj]
            if hasattr(attn, "qkv_proj")
            else [attn.q_proj, attn.k_proj, attn.v_proj]
        )
        norm1, norm2, post = _norms(block)
        if is_mixture(mlp):  # the model's own mixture block: router, experts, shared expert
            step = mixture_step(mlp) if native else None
            layer = _Layer(
                norm1, joint(qkv), getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                prompt_call(attn.o_proj), norm2, None, None, None,
                moe=functools.partial(_mixture, mlp, pooled_layers(mlp), step), mixture=step,
                post=post,
            )  # fmt: skip
            fast = (direct_group(qkv, layer.qkv), direct(attn.o_proj)) if native else None
            layer.fast = (*(fast or (layer.qkv, layer.o_proj)), None, None)
            return layer
        gate_up = (
            [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
        )
        layer = _Layer(
            norm1, joint(qkv), getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
            prompt_call(attn.o_proj), norm2, joint(gate_up),
            None if silu else getattr(mlp, "act_fn", None) or mlp.activation_fn,
            prompt_call(mlp.down_proj), post=post,
        )  # fmt: skip
        layer.fast = (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
        if native:
            fast_qkv, fast_gu = (direct_group(ms, joint) for ms, joint in
                                 ((qkv, layer.qkv), (gate_up, layer.gate_up)))  # fmt: skip
            layer.fast = (fast_qkv, direct(attn.o_proj), fast_gu, online_call(mlp.down_proj))
        return layer

    def new_cache(self, batch: int, capacity: int) -> StaticKVCache:
        """A cache of ``capacity`` slots per row (the RoPE table grows to cover it)."""
        if self.cos.shape[0] < capacity:
            positions = torch.arange(capacity).unsqueeze(0)  # (1, T)
            with torch.no_grad():  # the model's own rotary module: every RoPE variant it has
                cos, sin = self.inner.rotary_emb(torch.zeros(1), positions)  # (1, T, D)
            self.cos, self.sin = cos[0].float(), sin[0].float()
        shape = (len(self.layers), batch, self.kv_heads, capacity, self.head_dim)
        spec, dtype = self.attention, self.embed.weight.dtype
        if spec is not None and spec.codes:
            return QuantKVCache(*shape, spec.kv_bits, spec.group(self.head_dim))
        stored = torch.float16 if spec is not None and spec.float16 else dtype  # else as HF's
        return StaticKVCache(*shape, dtype=stored, read_as=dtype)

    def _positions(self, cache: StaticKVCache, start: int, t: int) -> tuple[Tensor, Tensor]:
        """cos/sin (B or 1, 1, t, D) of the slots start..start+t (positions skip the padding)."""
        if not bool(cache.pad.any()):
            return self.cos[start : start + t], self.sin[start : start + t]
        slots = torch.arange(start, start + t)
        pos = (slots.unsqueeze(0) - cache.pad.unsqueeze(1)).clamp_min(0)  # (B, t)
        return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)

    def _mask(self, cache: StaticKVCache, start: int, t: int) -> Tensor | None:
        """Boolean (B, 1, t, S) mask of the keys each query may see; None when every query sees
        all filled slots (one query, no padding)."""
        padded = bool(cache.pad.any())
        if (t == 1 or start == 0) and not padded:
            return None  # one query sees every slot; a fresh prompt is plainly causal
        end = start + t
        keys, queries = torch.arange(end), torch.arange(start, end)
        allowed = keys.unsqueeze(0) <= queries.unsqueeze(1)  # (t, S) causal
        real = keys.unsqueeze(0) >= cache.pad.unsqueeze(1)  # (B, S) not padding
        mask = allowed.unsqueeze(0) & real.unsqueeze(1)  # (B, t, S)
        mask |= keys.unsqueeze(0) == queries.unsqueeze(1)  # a padding query sees itself: no NaN
        return mask.unsqueeze(1)

    def __call__(self, ids: Tensor, cache: StaticKVCache, all_logits: bool = False) -> Tensor:
        """ids (B, t) -> logits (B, vocab) of the last position ((B, t, vocab) with
        ``all_logits``); the t new slots of ``cache`` are filled. A decode step on the native
        ops, or a prompt of up to ``GEMV_MAX_ROWS`` tokens into an empty cache, of a model whose
        layers all run on lowbit's pooled kernels (every layer call a pooled GEMV, no attention
        over a long cache in torch) holds torch's own ops to one thread meanwhile
        (:func:`lowbit.kernels.threads.torch_ops_on_one_thread`)."""
        spec = self.attention
        fused = ids.shape[1] == 1 and not all_logits and (spec is None or spec.kv_bits is not None)
        short = ids.numel() <= GEMV_MAX_ROWS and (fused or cache.length == 0)
        with torch_ops_on_one_thread(short and self._pooled):
            return self._forward(ids, cache, all_logits, fused)

    def _forward(self, ids: Tensor, cache: StaticKVCache, all_logits: bool, fused: bool) -> Tensor:
        if fused:
            return self._decode(ids, cache)  # the fused ops (a float cache, or one of codes)
        b, t = ids.shape
        start = cache.reserve(t)
        cos, sin = self._positions(cache, start, t)
        mask = self._mask(cache, start, t)
        x = self.embed(ids)  # (B, t, C)
        for i, layer in enumerate(self.layers):
            qn, kn = layer.q_norm, layer.k_norm
            q, k, v = rope_qk(  # (B, H, t, D), (B, Hkv, t, D) twice
                self._whole(layer, layer.qkv(_pre(layer.norm1, x))), cos, sin, self.heads,
                self.kv_heads,
                None if qn is None else qn.weight, None if kn is None else kn.weight,
                1e-6 if qn is None else _eps(qn),
            )  # fmt: skip
            h = self.rotation
            if self.attention is not None:  # the cache rounds the keys and values it stores
                q, k, v = round_qkv(self.attention, q, k, v, h, layer.key_center,
                                    keys_values=False)  # fmt: skip
            keys, values = cache.write(i, start, k, v)  # (B, Hkv, S, D); a QuantKVCache rounds
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                               is_causal=mask is None and t > 1,
                                               scale=self.scaling, enable_gqa=True)  # fmt: skip
            if h is not None:
                a = a @ h.T
            x = x + _post(layer, 0, layer.o_proj(a.transpose(1, 2).reshape(b, t, -1)))
            x = x + _post(layer, 1, self._mlp(layer, _pre(layer.norm2, x)))
        x = x if all_logits else x[:, -1:]
        logits = self.head(_rms(self.norm, x))
        return logits if all_logits else logits[:, -1]

    def _whole(self, layer: _Layer, qkv: Tensor) -> Tensor:
        """q/k/v with the queries and keys normalised over all heads at once (OLMoE), if so."""
        if layer.whole is None:
            return qkv
        hq, hk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([hq, hk, qkv.shape[-1] - hq - hk], dim=-1)
        q, k = (_rms(norm, t.contiguous()) for norm, t in zip(layer.whole, (q, k), strict=True))
        return torch.cat([q, k, v], dim=-1)  # (the one-call step's whole_norms)

    def _mlp(self, layer: _Layer, h: Tensor) -> Tensor:
        if layer.moe is not None:
            return layer.moe(h)
        return layer.down(self._mlp_act(layer, layer.gate_up(h)))

    @staticmethod
    def _mlp_act(layer: _Layer, gate_up: Tensor) -> Tensor:
        if layer.act is None:
            return silu_mul(gate_up.contiguous())
        gate, up = gate_up.chunk(2, dim=-1)
        return layer.act(gate) * up

    def _decode(self, ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One token per row (B, 1) -> logits (B, vocab): the fused decode ops
        (:mod:`lowbit.kernels.decode`), the residual add folded into the next norm."""
        pos = cache.reserve(1)
        codes = self.attention is not None and self.attention.codes  # else a float cache
        x = self.embed(ids[:, 0]).contiguous()  # (B, C), the residual stream (added in place)
        h = _pre(self.layers[0].norm1, x)
        plan = self._step
        # one call for every layer, up to PROMPT_ROWS rows (a batch of more: the per-op loop);
        # mixture blocks without hooks, up to their native step's rows (NativeMixture)
        contiguous = all(t.is_contiguous() for t in cache.tensors)
        rows = x.shape[0] <= decode_ops.PROMPT_ROWS
        plain = not any(m.unplain() or x.shape[0] > m.rows for m in self._mixtures)
        if plan is not None and contiguous and rows and plain and decode_ops._native(x):
            spec = self.attention
            bits, query_bits = (spec.kv_bits, spec.query_bits or 0) if codes else (0, 0)
            with torch_ops_on_one_thread(self._mixtures_pooled):  # (a router is a torch op)
                h = torch.ops.lowbit_cpu.decode_step(
                    x, h, plan, cache.tensors, self._centers if bits else [], self.turn,
                    self.cos, self.sin, cache.pad, pos, self.heads, self.kv_heads, self.scaling,
                    bits, query_bits,
                )  # fmt: skip
            return self.fast_head(h)
        for i, (layer, (qn, kn, eps, w2, eps2, w_next, eps_next)) in enumerate(self._plan):
            qkv_op, o_op, gate_up_op, down_op = layer.fast
            qkv = self._whole(layer, qkv_op(h)).contiguous()  # (B, (H + 2·Hkv)·D)
            if not codes:
                a = decode_attention(
                    qkv, cache.k[i], cache.v[i], self.cos, self.sin, cache.pad, pos,
                    self.heads, self.kv_heads, self.scaling, qn, kn, eps,
                )  # fmt: skip
            else:
                spec = self.attention
                a = decode_attention_codes(
                    qkv, *cache.layer(i), self.cos, self.sin, cache.pad, pos, self.heads,
                    self.kv_heads, self.scaling, qn, kn, eps, self._centers[i], self.turn,
                    spec.kv_bits, spec.query_bits or 0,
                )  # fmt: skip
            if layer.post is not None:  # post-norm: each output normed, then added
                x = x + _post(layer, 0, o_op(a))
                d = layer.moe(x) if layer.moe else down_op(self._mlp_act(layer, gate_up_op(x)))
                x = x + _post(layer, 1, d)
                h = x if i + 1 < len(self.layers) else _rms(self.norm, x)
                continue
            h = add_rms_norm(x, o_op(a), w2, eps2)  # (B, C)
            d = layer.moe(h) if layer.moe else down_op(self._mlp_act(layer, gate_up_op(h)))
            h = add_rms_norm(x, d.contiguous(), w_next, eps_next)
        return self.fast_head(h)  # (B, vocab)

    @functools.cached_property
    def _step(self) -> torch.ScriptObject | None:
        """The fixed arguments of ``lowbit_cpu::decode_step``, held once in C++ (a
        ``lowbit_cpu.DecodePlan``: the slots' weights and layout, norms, eps, and per layer
        q/k norms over all heads, a post-norm block's norms and a mixture block's native
        step): the same ops as :meth:`_decode`'s loop in one call. None where a layer is not
        all native parts (a module, an online rotation), the MLP is neither SiLU nor a mixture
        with its native step, a norm over all heads or a post-norm is not float32, attention
        inputs are rounded without a cache that stores them (queries alone), or a key centre
        or the heads' turn is not float32. A float16 cache (kv_bits 16) runs
        decode_attention, as a float32 one."""
        spec = self.attention
        if spec is not None and (spec.kv_bits is None or any(
                t.dtype != torch.float32 or not t.is_contiguous()
                for t in (self.turn, *self._centers))):  # fmt: skip
            return None
        if any(layer.act or (layer.moe and layer.mixture is None) for layer in self.layers):
            return None
        if any(norms and any(n.weight.dtype != torch.float32 for n in norms)
               for layer in self.layers for norms in (layer.whole, layer.post)):  # fmt: skip
            return None
        slots = [call for layer in self.layers for call in layer.fast if call is not None]
        if not all(isinstance(call, Native) for call in slots):
            return None
        plan = torch.classes.lowbit_cpu.DecodePlan(*self._step_lists())
        for i, layer in enumerate(self.layers):
            if layer.whole:
                wq, wk = layer.whole
                plan.set_whole(i, wq.weight.contiguous(), wk.weight.contiguous(), _eps(wq),
                               _eps(wk))  # fmt: skip
            if layer.post is not None:
                wa, wm = layer.post
                plan.set_post(i, wa.weight.contiguous(), wm.weight.contiguous(), _eps(wa),
                              _eps(wm))  # fmt: skip
            if layer.mixture is not None:
                plan.set_mixture(i, layer.mixture.held)
        return plan

    def _step_lists(self) -> tuple[list[Tensor], list[int], list[Tensor], list[float]]:
        """The plan's weights and layout of the slots, norms and eps (as ``DecodePlan`` takes
        them), of layers whose slots are all native calls."""
        weights, layout, norms, eps = [], [], [], []
        for layer, (qn, kn, e, w2, e2, w_next, e_next) in self._plan:
            for slot in (s for s in layer.fast if s is not None):  # (a mixture has 2 slots)
                layout.append(len(slot.parts))
                for kind, group, bits, tensors in slot.parts:
                    layout += [kind, group, bits]
                    weights += tensors
            norms += [qn, kn, w2, w_next]
            eps += [e, e2, e_next]
        return weights, layout, norms, eps

    @functools.cached_property
    def _mixtures(self) -> list[NativeMixture]:
        """The mixture blocks' native steps, for the one-call step's hook checks."""
        return [layer.mixture for layer in self.layers if layer.mixture is not None]

    @functools.cached_property
    def _mixtures_pooled(self) -> bool:
        """Whether a mixture block's kernels run on the pool (its torch ops then on one
        thread, as :func:`_mixture` holds them)."""
        return any(pooled_layers(m.block) for m in self._mixtures)

    @functools.cached_property
    def _centers(self) -> list[Tensor]:
        """Per layer, the key centres a decode step over codes subtracts (empty: none)."""
        empty = torch.empty(0)
        return [empty if layer.key_center is None else layer.key_center for layer in self.layers]

    @functools.cached_property
    def _plan(self) -> list[tuple]:
        """Per layer, what the decode step reads besides the layers: q/k norm weights (or
        empty) and their eps, the post-attention norm, and the next norm (the final one last)."""
        empty, plan = torch.empty(0), []
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.norm
            qk = (empty, empty, 1e-6) if layer.q_norm is None else (
                layer.q_norm.weight, layer.k_norm.weight, _eps(layer.q_norm))  # fmt: skip
            norms = [(empty, 1e-6) if n is None else (n.weight, _eps(n))  # (post-norm: none)
                     for n in (layer.norm2, nxt)]  # fmt: skip
            plan.append((layer, (*qk, *norms[0], *norms[1])))
        return plan


def is_mixture(mlp: nn.Module) -> bool:
    """Whether a block's MLP is a mixture of experts (its experts as linears)."""
    return any(isinstance(m, LinearExperts) for m in mlp.modules())


def _mixture(mlp: nn.Module, pooled: bool, step: Callable[[Tensor], Tensor] | None,
             h: Tensor) -> Tensor:  # fmt: skip
    """The mixture block on (..., C): transformers' blocks take (B, T, C), a decode step's
    (B, C) as (B, 1, C); a decode step's rows go to ``step`` where there is one and it takes
    that many (the native call, :func:`lowbit.models.mixture_step.mixture_step`, each row as
    alone). In a ``pooled`` block, on up to
    ``GEMV_MAX_ROWS`` tokens (so that every expert's kernel is a pooled GEMV, not a prompt GEMM
    on torch's threads), the block's torch ops (its router, the routing) run on one thread and
    its layers' kernels on the pool: OpenMP's spinning threads would take the pool's cores
    (:func:`lowbit.kernels.threads.torch_ops_on_one_thread`; OLMoE's shape, W4, 2 cores:
    a 32-token prompt 39.8 -> 55.3 tok/s)."""
    x = h.reshape(-1, 1, h.shape[-1]) if h.dim() == 2 else h
    with torch_ops_on_one_thread(pooled and x.shape[0] * x.shape[1] <= GEMV_MAX_ROWS):
        if step is not None and h.dim() == 2 and h.shape[0] <= step.rows:  # decode rows
            return step(h)
        return mlp(x).reshape(h.shape)
