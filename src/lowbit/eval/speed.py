"""Speed of a causal LM as a user feels it: prefill, time to first token, greedy decode.

One *run* feeds a ``prompt`` of random token ids (speed does not depend on the ids) through the
model's decode loop (:mod:`lowbit.runtime`, the loop ``lowbit generate`` uses), takes the argmax
as the first new token (time to first token), then decodes greedily at batch 1 until
``new_tokens`` tokens exist. Several runs of several models
alternate (model A, model B, A, B, ...) so that a noisy shared machine slows all of them alike;
the reported figure of each measure is the median over its runs.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.machine import EnergyMeter
from lowbit.models.modules import context_limit
from lowbit.runtime import Runtime


@dataclass
class RunTimes:
    """One run: seconds for the prompt (to the first token) and for the decode steps after it."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float
    decode_joules: float | None = None
    kv_bytes_per_token: int | None = None  # the cache's bytes per token of context

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tps(self) -> float:
        return (self.new_tokens - 1) / self.decode_s


@dataclass
class SpeedResult:
    """Medians over runs of one model."""

    runs: list[RunTimes] = field(default_factory=list)

    def _median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)

    @property
    def prefill_tps(self) -> float:
        return self._median("prefill_tps")

    @property
    def decode_tps(self) -> float:
        return self._median("decode_tps")

    @property
    def ttft_s(self) -> float:
        return self._median("ttft_s")

    @property
    def kv_bytes_per_token(self) -> int | None:
        return self.runs[0].kv_bytes_per_token if self.runs else None

    @property
    def joules_per_token(self) -> float | None:
        values = [r.decode_joules / (r.new_tokens - 1) for r in self.runs if r.decode_joules]
        return statistics.median(values) if values else None

    def to_dict(self) -> dict:
        return {
            "prefill_tps": round(self.prefill_tps, 3),
            "decode_tps": round(self.decode_tps, 3),
            "ttft_s": round(self.ttft_s, 4),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "joules_per_token": None
            if self.joules_per_token is None
            else round(self.joules_per_token, 4),
            "runs": [asdict(r) for r in self.runs],
        }


def timed_run(runtime: Runtime, prompt: Tensor, new_tokens: int, meter: EnergyMeter) -> RunTimes:
    """Prefill ``prompt`` (1, P), then greedy-decode to ``new_tokens`` new tokens (≥ 2), on the
    decode loop ``lowbit generate`` runs (:class:`lowbit.runtime.Runtime`)."""
    started: list[bool] = []

    def on_tokens(_: list) -> None:  # first token chosen: the decode steps start
        if not started:
            started.append(True)
            meter.start()

    run = runtime.generate(prompt.tolist(), new_tokens, on_tokens=on_tokens)
    joules = meter.stop()
    return RunTimes(prompt.shape[1], new_tokens, run.prefill_s, run.decode_s, joules,
                    run.kv_bytes_per_token)  # fmt: skip


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=g)


def measure_speed(
    models: dict[str, nn.Module],
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, SpeedResult]:
    """Alternate ``repeats`` timed runs of each model (after one short warm-up run each)."""
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1:
        raise LowbitError("need new_tokens >= 2, prompt_tokens >= 1 and repeats >= 1")
    first = next(iter(models.values()))
    for name, model in models.items():  # every model runs the one prompt: each must take it
        limit = context_limit(model.config)
        if limit and prompt_tokens + new_tokens > limit:
            raise LowbitError(
                f"prompt + new tokens = {prompt_tokens + new_tokens} exceed {name}'s {limit} "
                f"positions; use a shorter --prompt-tokens or --new-tokens"
            )
    vocab = min(model.config.vocab_size for model in models.values())  # ids all of them know
    device = next(first.parameters()).device
    prompt = random_prompt(vocab, prompt_tokens)
    meter = EnergyMeter(device.type)
    runtimes = {name: Runtime(model) for name, model in models.items()}
    for runtime in runtimes.values():  # warm-up: kernels built, caches allocated, pages touched
        timed_run(runtime, prompt[:, :16], 4, meter)
    results = {name: SpeedResult() for name in models}
    bar = tqdm(total=repeats * len(models), desc="bench", unit="run", disable=not progress)
    for _ in range(repeats):
        for name in models:
            run = timed_run(runtimes[name], prompt, new_tokens, meter)
            results[name].runs.append(run)
            bar.set_postfix({name: f"{run.decode_tps:.1f} tok/s"})
            bar.update()
    bar.close()
    return results
