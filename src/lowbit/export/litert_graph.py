"""The torch graphs a LiteRT export converts: a plain forward for scoring, and prefill/decode
steps over an explicit KV cache for generation.

``forward``: ``input_ids`` (1, S) -> ``logits`` (1, S, vocab), the model's own forward with no
cache (any decoder torch.export can trace). ``prefill``/``decode`` (Llama, Mistral, Qwen2,
Qwen3): the same arithmetic as :mod:`lowbit.runtime.llama`'s prefill path written as a pure
function of its inputs, because a LiteRT signature cannot hold state: ``tokens`` (1, T),
``input_pos`` (T,) the consecutive slots the tokens fill, ``last`` (1,) the position whose
logits are returned and each layer's cache ``k_i``/``v_i`` (1, Hkv, C, D) in; ``logits``
(1, vocab) and only the new keys and values ``k_i``/``v_i`` (1, Hkv, T, D) out. The cache is
read, never copied: attention runs over the cache's slots before ``input_pos[0]`` and over the
new keys (causally), softmaxed together, and the caller writes the new rows into its cache (a
step costs its arithmetic, not a copy of the whole cache). A prompt right-padded to the prefill
length leaves junk only in slots past its end, which no query sees before they are rewritten.

litert-torch's own Hugging Face exporter (``litert_torch.generative.export_hf``) builds similar
signatures, but only from a model folder on disk (lowbit's layers are packed codes, not
checkpoint tensors), imports a TensorFlow module that is not installed here, and has no
all-positions forward for scoring; the graph below is small and calls the model's own modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.kernels.decode import rotate
from lowbit.runtime.llama import FAMILIES
from lowbit.runtime.llama_twin import post_norm, unsupported_reason


class Forward(nn.Module):
    """input_ids -> logits of every position, no cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model(input_ids=input_ids.long(), use_cache=False).logits}


def cache_reason(model: nn.Module, capacity: int) -> str | None:
    """Why ``model`` gets no KV-cache signatures, or None: the compact forward's rule (the
    steps below compute what it does), a family it names or one whose tiny twin shows it."""
    reason = unsupported_reason(model, capacity)
    if reason is None and post_norm(model):
        reason = "its blocks are post-norm (the cached steps are Llama's pre-norm blocks)"
    if reason is None:
        return None
    return (f"{reason} (KV-cache export covers {', '.join(FAMILIES)} and families with "
            f"Llama's arithmetic)")  # fmt: skip


class CachedStep(nn.Module):
    """One prefill or decode step of a Llama-like decoder over caches passed in and out."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        super().__init__()
        cfg, inner = model.config, model.model
        self.model = model  # registers the layers once (the converter shares their weights)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.capacity = capacity
        with torch.no_grad():  # the model's own rotary module: every RoPE variant it has
            cos, sin = inner.rotary_emb(torch.zeros(1), torch.arange(capacity).unsqueeze(0))
        self.register_buffer("cos", cos[0].float(), persistent=False)  # (C, D)
        self.register_buffer("sin", sin[0].float(), persistent=False)
        self.register_buffer("slots", torch.arange(capacity, dtype=torch.int32), persistent=False)

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.capacity, self.head_dim)

    def sample(self, t: int) -> dict[str, Tensor]:
        """Sample inputs of a step over ``t`` tokens (the signature's shapes)."""
        layers = len(self.model.model.layers)
        caches = {f"{kind}_{i}": torch.zeros(self.cache_shape()) for i in range(layers)
                  for kind in ("k", "v")}  # fmt: skip
        return {"tokens": torch.zeros(1, t, dtype=torch.int32),
                "input_pos": torch.arange(t, dtype=torch.int32),
                "last": torch.tensor([t - 1], dtype=torch.int32), **caches}  # fmt: skip

    def forward(self, tokens: Tensor, input_pos: Tensor, last: Tensor, **caches: Tensor):
        inner, t = self.model.model, tokens.shape[1]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        group = h // kv
        cos, sin = self.cos[input_pos][None, :, None], self.sin[input_pos][None, :, None]
        old = self.slots < input_pos[0]  # (C,) cache slots filled before this call
        causal = input_pos.unsqueeze(0) <= input_pos.unsqueeze(1)  # (T, T) among the new
        causal = causal.repeat(group, 1)  # rows of the (G·T) queries sharing a KV head
        x = inner.embed_tokens(tokens)  # (1, T, C)
        out: dict[str, Tensor] = {}
        for i, block in enumerate(inner.layers):
            attn = block.self_attn
            q, k, v = _qkv(attn, block.input_layernorm(x), h * d, kv * d)
            q, k = q.view(1, t, h, d), k.view(1, t, kv, d)
            v = v.view(1, t, kv, d).transpose(1, 2)  # (1, Hkv, T, D)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = rotate(q, cos, sin).transpose(1, 2)  # (1, H, T, D)
            k = rotate(k, cos, sin).transpose(1, 2)  # (1, Hkv, T, D)
            out[f"k_{i}"], out[f"v_{i}"] = k, v
            ck, cv = caches[f"k_{i}"], caches[f"v_{i}"]  # (1, Hkv, C, D), read only
            qg = q.reshape(1, kv, group * t, d)  # heads h = j·G + g share KV head j
            floor = torch.finfo(q.dtype).min
            s_old = torch.where(old, torch.matmul(qg, ck.transpose(2, 3)) * attn.scaling, floor)
            s_new = torch.where(causal, torch.matmul(qg, k.transpose(2, 3)) * attn.scaling, floor)
            p = torch.softmax(torch.cat([s_old, s_new], dim=-1), dim=-1)  # (1, Hkv, G·T, C+T)
            a = torch.matmul(p[..., : self.capacity], cv) + torch.matmul(p[..., self.capacity :], v)
            a = a.reshape(1, h, t, d).transpose(1, 2).reshape(1, t, h * d)
            x = x + attn.o_proj(a)
            x = x + block.mlp(block.post_attention_layernorm(x))
        x = torch.index_select(x, 1, last)  # (1, 1, C)
        out["logits"] = self.model.lm_head(inner.norm(x))[:, 0]  # (1, vocab)
        return out


def _qkv(attn: nn.Module, x: Tensor, q_width: int, kv_width: int) -> tuple[Tensor, ...]:
    """Queries, keys and values: three projections, or Phi-3's fused ``qkv_proj`` (rows in
    that order)."""
    if hasattr(attn, "qkv_proj"):
        return attn.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
