"""The model's own forward as a runtime, for decoders :mod:`lowbit.runtime.llama` does not cover.

Same interface as :class:`lowbit.runtime.llama.LlamaForward`; transformers' dynamic cache holds
the keys and values, padding is an attention mask and positions skip it. Slower at decode (the
framework's per-token overhead stays), never different in its results. A prompt of up to
``GEMV_MAX_ROWS`` tokens into an empty cache (every layer call a GEMV) of a model whose layers
all run on lowbit's pooled kernels holds torch's own ops to one thread
(:func:`lowbit.kernels.threads.torch_ops_on_one_thread`): OpenMP's threads, spinning after
each of torch's parallel regions, took the kernels' cores. Decode steps do not: transformers'
attention over the whole cache runs in torch (holding them took OLMoE's shape from 11.4 to
17.5 tok/s at a short context, and would put a long context's attention on one thread).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels.affine import GEMV_MAX_ROWS
from lowbit.kernels.build import native_ops
from lowbit.kernels.threads import torch_ops_on_one_thread
from lowbit.models.kernels import pooled_layers
from lowbit.runtime.kv_cache import Slots


class HFCache(Slots):
    """Transformers' cache object plus the slot bookkeeping every cache has, and the ids fed so
    far (a LongRoPE model reads them again, see :class:`HFForward`)."""

    def __init__(self, batch: int, capacity: int) -> None:
        super().__init__(batch, capacity)
        self.past = None
        self.ids: Tensor | None = None


class HFForward:
    """``forward(ids, cache)`` through ``model(...)`` with transformers' cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # transformers renamed past_key_values to cache (5.2x); older 5.x only has the former
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._pooled = native_ops() and pooled_layers(model)
        self._switch = longrope_switch(model.config)

    def new_cache(self, batch: int, capacity: int) -> HFCache:
        return HFCache(batch, capacity)

    def __call__(self, ids: Tensor, cache: HFCache, all_logits: bool = False) -> Tensor:
        t = new = ids.shape[1]
        start = cache.reserve(t)
        if self._switch is not None:  # (only a LongRoPE model needs its ids again)
            cache.ids = ids if start == 0 else torch.cat([cache.ids, ids], dim=1)
        if self._switch is not None and 0 < start <= self._switch < start + t:
            # LongRoPE rotates every position with its long factors once the sequence outgrows
            # the original context, and the cached keys were rotated with the short ones: the
            # whole sequence is read again, as transformers' generate does for Phi-3
            cache.past, ids, start, t = None, cache.ids, 0, start + t
        kwargs = {self._cache_arg: cache.past, "use_cache": True}
        if bool(cache.pad.any()):
            slots = torch.arange(start + t)
            real = slots.unsqueeze(0) >= cache.pad.unsqueeze(1)  # (B, S)
            pos = (slots[start:].unsqueeze(0) - cache.pad.unsqueeze(1)).clamp_min(0)  # (B, t)
            kwargs |= {"attention_mask": real.long(), "position_ids": pos}
        if not all_logits:
            kwargs["logits_to_keep"] = 1
        short = ids.numel() <= GEMV_MAX_ROWS and start == 0  # a short prompt, an empty cache
        with torch_ops_on_one_thread(self._pooled and short):
            out = self.model(ids, **kwargs)
        past = getattr(out, "cache", None)
        cache.past = getattr(out, "past_key_values", None) if past is None else past
        if cache.past is None:  # e.g. RecurrentGemma, whose output holds no cache to pass back
            kind = getattr(self.model.config, "model_type", type(self.model).__name__)
            raise LowbitError(f"{kind} returns no key/value cache to decode from (it keeps its "
                              f"own state), which lowbit's decode loop needs: generation is not "
                              f"supported for this model")  # fmt: skip
        return out.logits[:, -new:] if all_logits else out.logits[:, -1]


def longrope_switch(config: object) -> int | None:
    """The length past which a LongRoPE model switches to its long factors (None: not one)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = params if isinstance(params, dict) else {}
    if params.get("rope_type", params.get("type")) != "longrope":
        return None
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None)  # fmt: skip
    return original if isinstance(original, int) else None
