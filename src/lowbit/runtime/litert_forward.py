"""The decode loop's forward over a LiteRT export's ``prefill`` and ``decode`` signatures.

Same interface as :class:`lowbit.runtime.llama.LlamaForward`. The KV cache lives in the
interpreter's own input buffers of the ``decode`` signature (the file's primary subgraph, whose
buffers the interpreter exposes as numpy views): each step passes the cache read-only and gets
back only the new keys and values, which are written into those buffers in place, so a step
copies a few rows, never the whole cache. A prompt is fed through ``prefill`` in chunks of the
export's length (given a copy of the cache), the last chunk right-padded; a chunk that would
run past the cache is moved back to end at its last slot and re-feeds earlier tokens at their
own positions (they recompute the same keys and values).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.runtime.kv_cache import Slots


class LiteRTCache(Slots):
    """Slot bookkeeping and every token fed so far (the keys and values are the
    interpreter's; one generation at a time per interpreter)."""

    def __init__(self, capacity: int, bytes_per_token: int) -> None:
        super().__init__(1, capacity)
        self.fed: list[int] = []
        self._bytes_per_token = bytes_per_token

    def bytes_per_token(self) -> int:
        return self._bytes_per_token


def require_decode(model) -> None:
    """A one-line error unless the LiteRT export ``model`` can generate (KV-cache signatures)."""
    if "decode" not in model.info["signatures"]:
        raise LowbitError(f"{model.path.name} has no KV-cache signatures; re-export it "
                          "with --kv-cache to generate with it")  # fmt: skip


class LiteRTForward:
    """``forward(ids, cache)`` through a :class:`lowbit.models.litert.LiteRTModel`'s
    interpreter."""

    def __init__(self, model) -> None:
        require_decode(model)
        sigs = model.info["signatures"]
        self.interp = model.interpreter
        self.chunk, self.capacity = sigs["prefill"]["tokens"], sigs["prefill"]["cache"]
        decode = self.interp.get_signature_runner("decode")
        self.ins = {k: d["index"] for k, d in decode.get_input_details().items()}
        self.outs = {k: d["index"] for k, d in decode.get_output_details().items()}
        # a live signature runner holds the interpreter, which then refuses invoke() and
        # allocate_tensors() (its guard against numpy views): runners are made per call
        del decode
        if {d["index"] for d in self.interp.get_input_details()} != set(self.ins.values()):
            raise LowbitError(f"{model.path.name}: `decode` is not the primary subgraph; "
                              "re-export it with this version of lowbit")  # fmt: skip
        self.interp.allocate_tensors()
        self.caches = sorted(k for k in self.ins if k[:2] in ("k_", "v_"))
        per_slot = sum(self._view(self.ins[k]).nbytes for k in self.caches) // self.capacity
        self.bytes_per_token = per_slot

    def _view(self, index: int) -> np.ndarray:
        """A numpy view of a primary-subgraph tensor (never held across an invoke)."""
        return self.interp.tensor(index)()

    def new_cache(self, batch: int, capacity: int) -> LiteRTCache:
        if batch != 1:
            raise LowbitError("a LiteRT export runs one prompt at a time (batch 1)")
        if capacity > self.capacity:
            raise LowbitError(f"prompt + new tokens ({capacity}) exceed the export's KV cache "
                              f"of {self.capacity}; re-export with a larger --cache")  # fmt: skip
        for name in self.caches:  # fresh buffers hold garbage: 0·NaN in masked slots is NaN
            self._view(self.ins[name])[...] = 0
        return LiteRTCache(self.capacity, self.bytes_per_token)

    def __call__(self, ids: Tensor, cache: LiteRTCache, all_logits: bool = False) -> Tensor:
        """ids (1, t) -> logits (1, vocab) of the last position."""
        if all_logits:
            raise LowbitError("a LiteRT export's prefill returns the last position's logits")
        start = cache.reserve(ids.shape[1])
        cache.fed += ids[0].tolist()
        if ids.shape[1] == 1:
            return self._decode(int(ids[0, 0]), start)
        for first in range(start, cache.length, self.chunk):
            logits = self._prefill(cache, min(first, self.capacity - self.chunk))
        return logits

    def _decode(self, token: int, pos: int) -> Tensor:
        self._view(self.ins["tokens"])[...] = token
        self._view(self.ins["input_pos"])[...] = pos
        self._view(self.ins["last"])[...] = 0
        self.interp.invoke()
        for name in self.caches:
            self._view(self.ins[name])[:, :, pos : pos + 1] = self._view(self.outs[name])
        return torch.from_numpy(self._view(self.outs["logits"]).copy())

    def _prefill(self, cache: LiteRTCache, first: int) -> Tensor:
        """Feed the tokens of slots first.. (at most one chunk, up to what was fed)."""
        real = cache.fed[first : min(first + self.chunk, cache.length)]
        tokens = np.zeros((1, self.chunk), np.int32)
        tokens[0, : len(real)] = real
        caches = {k: self._view(self.ins[k]).copy() for k in self.caches}
        prefill = self.interp.get_signature_runner("prefill")
        out = prefill(tokens=tokens,
                      input_pos=np.arange(first, first + self.chunk, dtype=np.int32),
                      last=np.array([len(real) - 1], np.int32), **caches)  # fmt: skip
        del prefill
        end = first + self.chunk
        for name in self.caches:
            self._view(self.ins[name])[:, :, first:end] = out[name]
        return torch.from_numpy(out["logits"].copy())
