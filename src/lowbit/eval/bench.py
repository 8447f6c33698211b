"""``lowbit bench``: speed, memory and energy of one model, or of several side by side.

Figures per model: prefill tokens/s, decode tokens/s, time to first token (medians of alternating
runs, :mod:`lowbit.eval.speed`), weight bytes in RAM, peak RSS measured alone in a child process
(:mod:`lowbit.eval.memprobe`), energy per decoded token where counters are readable; and per
machine the measured read bandwidth, which bounds decode: every token reads every weight once, so
``bandwidth / bytes read per token`` is the fastest decode possible, and the fraction of it that
a model reaches says how much is left to gain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.eval.machine import memory_bandwidth_gbs, thread_settings
from lowbit.eval.memprobe import probe_in_subprocess
from lowbit.eval.size import model_size
from lowbit.eval.speed import SpeedResult, measure_speed
from lowbit.models.experts import LinearExperts, is_fused_experts

log = logging.getLogger(__name__)


@dataclass
class BenchResult:
    model: str
    speed: SpeedResult
    weight_bytes: int
    bytes_per_token: int
    bandwidth_gbs: float
    peak_rss_mb: float | None = None

    @property
    def bound_decode_tps(self) -> float:
        """The bandwidth-bound decode limit: tokens/s if reading the weights were all the work."""
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token

    @property
    def bound_fraction(self) -> float:
        return self.speed.decode_tps / self.bound_decode_tps

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.speed.to_dict(),
            "weight_bytes": self.weight_bytes,
            "bytes_per_token": self.bytes_per_token,
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "bandwidth_gbs": round(self.bandwidth_gbs, 2),
            "bound_decode_tps": round(self.bound_decode_tps, 2),
            "bound_fraction": round(self.bound_fraction, 4),
        }


def _weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(weight bytes held, weight bytes one decode step reads)."""
    if hasattr(model, "file_bytes"):  # a LiteRT export: the interpreter maps the whole file
        return model.file_bytes(), model.file_bytes()
    return model_size(model).total_bytes, bytes_read_per_token(model)


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: all of them, except the input embedding table (one row
    per token) unless the output head shares it, and a mixture's experts that the token is not
    routed to (k of each block's n experts are read: ``num_experts_per_tok``)."""
    total = model_size(model).total_bytes - _unrouted_bytes(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        return total
    table = emb.weight
    tied = head is not None and getattr(head, "weight", None) is not None
    # the same bytes (not the same storage: a loaded model's tensors all share one block)
    tied = tied and (head.weight.data_ptr(), head.weight.shape) == (table.data_ptr(), table.shape)
    return total if tied else total - table.numel() * table.element_size()


def bench_models(
    models: dict[str, nn.Module],
    sources: dict[str, str] | None = None,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    progress: bool = True,
) -> tuple[dict[str, BenchResult], dict[str, Any]]:
    """Bench ``models`` side by side; ``sources`` (name -> what to load) enables the peak-RSS
    probe of each in its own process. Returns the results and the machine facts."""
    bandwidth = memory_bandwidth_gbs()
    machine = {"bandwidth_gbs": round(bandwidth, 2), **thread_settings()}
    speeds = measure_speed(models, prompt_tokens, new_tokens, repeats, progress)
    results = {}
    for name, model in models.items():
        rss = None
        if sources and name in sources:
            rss = probe_in_subprocess(sources[name], prompt_tokens, 8)["peak_rss_mb"]
        held, read = _weight_bytes(model)
        results[name] = BenchResult(name, speeds[name], held, read, bandwidth, rss)
    return results, machine


def speedups(result: BenchResult, ref: BenchResult) -> dict[str, float]:
    """This model's speed and size relative to ``ref`` (> 1: faster / for memory: smaller)."""
    out = {
        "speedup_decode": round(result.speed.decode_tps / ref.speed.decode_tps, 3),
        "speedup_prefill": round(result.speed.prefill_tps / ref.speed.prefill_tps, 3),
        "weight_memory_ratio": round(result.weight_bytes / ref.weight_bytes, 4),
    }
    kv, ref_kv = result.speed.kv_bytes_per_token, ref.speed.kv_bytes_per_token
    if kv and ref_kv:
        out["kv_memory_ratio"] = round(kv / ref_kv, 4)
    return out


def _unrouted_bytes(model: nn.Module) -> int:
    """Bytes of the experts a decoded token does not run: (n - k) / n of each block's experts,
    as linears (lowbit's) or fused 3-D weights (transformers')."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(k, int):
        return 0
    total = 0
    for m in model.modules():
        if isinstance(m, LinearExperts):
            n, held = m.num_experts, model_size(m).total_bytes
        elif is_fused_experts(m):
            n = m.gate_up_proj.shape[0]
            held = sum(p.numel() * p.element_size() for p in (m.gate_up_proj, m.down_proj))
        else:
            continue
        total += held * max(n - k, 0) // n
    return total
