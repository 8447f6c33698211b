"""The decode loop: prefill a batch of prompts, then choose and feed one token per step.

:class:`Runtime` holds a model's forward: the compact one of :mod:`lowbit.runtime.llama` over a
static KV cache where the family allows it, else the model's own (:mod:`lowbit.runtime.hf_forward`,
logged once). ``lowbit generate``, ``lowbit chat`` and ``lowbit bench`` all run this loop, so
the figures bench prints are what a user of generate gets.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.runtime.batch import ContinuousBatch
from lowbit.runtime.hf_forward import HFForward
from lowbit.runtime.litert_forward import LiteRTForward
from lowbit.runtime.llama import LlamaForward, capacity_reason
from lowbit.runtime.llama_twin import family_reason
from lowbit.runtime.sampling import Sampling, next_tokens

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """New tokens per prompt, why each stopped (``stop``: a stop token, not kept; ``length``:
    max_new_tokens) and the time to the first token (prefill) and for the steps after it."""

    tokens: list[list[int]]
    finish: list[str]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    steps: int = 0
    kv_bytes_per_token: int | None = None
    path: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens * len(self.tokens) / self.prefill_s

    @property
    def decode_tps(self) -> float:
        """Generated tokens per second after the first one, every row counted."""
        return self.steps * len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runtime:
    """A causal LM ready to generate. ``compact=False`` forces the model's own forward."""

    def __init__(self, model: nn.Module, compact: bool = True) -> None:
        self.model = model
        self.limit = (getattr(model, "generation_limit", None)  # a LiteRT file's cache
                      or getattr(model.config, "max_position_embeddings", None))  # fmt: skip
        self.compact = compact
        self._forwards: dict[str, object] = {}

    @property
    def context(self) -> int:
        """The most tokens a sequence may hold: the model's ``max_position_embeddings``, or
        4,096 for a model that names none."""
        return self.limit or 4096

    @functools.cached_property
    def _family_reason(self) -> str | None:  # a family it does not name: its twin, once
        return family_reason(self.model)

    def forward_for(self, capacity: int) -> LlamaForward | HFForward | LiteRTForward:
        """The forward for a context of ``capacity`` tokens (each kind built once)."""
        if hasattr(self.model, "interpreter"):  # a LiteRT export: its own prefill/decode
            if "litert" not in self._forwards:
                self._forwards["litert"] = LiteRTForward(self.model)
            return self._forwards["litert"]
        reason = (
            self._family_reason or capacity_reason(self.model, capacity)
            if self.compact
            else "asked for"
        )
        kind = "hf" if reason else "compact"
        if kind not in self._forwards:
            if reason:
                log.info("runtime: the model's own forward (%s)", reason)
            self._forwards[kind] = (HFForward if reason else LlamaForward)(self.model)
        return self._forwards[kind]

    def continuous(self, rows: int, stop_ids: Sequence[int] = ()) -> ContinuousBatch | None:
        """A batch that prompts join and leave between steps (:mod:`lowbit.runtime.batch`),
        or None where the forward cannot write its cache by rows (the model's own forward,
        LiteRT): run those with :meth:`generate`."""
        context = self.context
        forward = self.forward_for(context)
        if not isinstance(forward, LlamaForward):
            return None
        return ContinuousBatch(forward, rows, context, stop_ids)

    def _check(self, prompts: Sequence[Sequence[int]], limits: list[int]) -> int:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LowbitError("the prompt is empty: give at least one token")
        if len(limits) != len(prompts) or min(limits) < 1:
            raise LowbitError(f"max_new_tokens must be at least 1, got {min(limits)}")
        longest = max(len(p) for p in prompts)
        if self.limit and longest + max(limits) > self.limit:
            raise LowbitError(
                f"prompt ({longest} tokens) + max_new_tokens ({max(limits)}) exceed the "
                f"model's context of {self.limit} tokens; shorten the prompt or ask for fewer"
            )
        return longest

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        sampling: Sampling | None = None,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int | None]], object] | None = None,
        on_logits: Callable[[Tensor], None] | None = None,
    ) -> Generation:
        """Generate for each prompt (lists of token ids; shorter ones are left-padded) up to
        ``max_new_tokens`` new tokens (one limit, or one per prompt). ``on_tokens`` gets each
        step's new token of every prompt (None for a prompt that has finished) as soon as it
        is chosen; it may return False to stop every prompt, or the indices of prompts to stop
        (a client that went away): those end as ``cancelled``. ``on_logits`` sees each step's
        logits (B, vocab) before the tokens are chosen (the server's quality monitor)."""
        sampling = sampling or Sampling()
        limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
                  else list(max_new_tokens))  # fmt: skip
        longest = self._check(prompts, limits)
        forward = self.forward_for(longest + max(limits))
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # (B, P)
        cache = forward.new_cache(len(prompts), longest + max(limits))
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :] = torch.tensor(list(p))
            cache.pad[row] = longest - len(p)
        gen = None if sampling.greedy else sampling.generator()
        rows = _Rows(limits, set(stop_ids))
        _sync(device)
        start = time.perf_counter()
        token = next_tokens(_seen(forward(ids.to(device), cache), on_logits), sampling, gen)  # (B,)
        _sync(device)
        first = time.perf_counter()
        steps = 0
        while True:
            new = rows.record(token.tolist())
            if on_tokens is not None:
                rows.cancel(on_tokens(new))
            if rows.done():
                break
            logits = _seen(forward(token.view(-1, 1), cache), on_logits)
            token = next_tokens(logits, sampling, gen)
            steps += 1
        _sync(device)
        end = time.perf_counter()
        kv = cache.bytes_per_token() if hasattr(cache, "bytes_per_token") else None
        path = {LlamaForward: "compact", LiteRTForward: "litert"}.get(type(forward), "hf")
        return Generation(rows.tokens, rows.finished(), longest, first - start, end - first,
                          steps, kv, path)  # fmt: skip


def _seen(logits: Tensor, hook: Callable[[Tensor], None] | None) -> Tensor:
    if hook is not None:
        hook(logits)
    return logits


class _Rows:
    """Each prompt's new tokens and state: running, or finished by a stop token (not kept),
    its limit, or cancellation."""

    def __init__(self, limits: list[int], stops: set[int]) -> None:
        self.limits, self.stops = limits, stops
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.finish: list[str | None] = [None] * len(limits)

    def record(self, chosen: list[int]) -> list[int | None]:
        """Append each running row's token; the tokens appended (None: row finished)."""
        new: list[int | None] = []
        for row, t in enumerate(chosen):
            if self.finish[row] is not None:
                new.append(None)
                continue
            if t in self.stops:
                self.finish[row] = "stop"
                new.append(None)
                continue
            self.tokens[row].append(t)
            new.append(t)
            if len(self.tokens[row]) >= self.limits[row]:
                self.finish[row] = "length"
        return new

    def cancel(self, answer: object) -> None:
        if answer is None or answer is True:
            return
        targets = range(len(self.limits)) if answer is False else answer
        for row in targets:
            if self.finish[row] is None:
                self.finish[row] = "cancelled"

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def finished(self) -> list[str]:
        return [f or "cancelled" for f in self.finish]
