"""Perplexity, and KL / top-1 agreement against a reference model, on the same token windows.

Protocol (GPTQ-style, comparable with the papers): documents joined by blank lines, tokenized
once, cut into non-overlapping windows of ``seqlen`` tokens; each window is scored on its own
(no carried state) and ppl = exp(mean NLL over every predicted token). KL(ref ‖ model) is the
mean over the same predicted tokens of sum_v p_ref(v)·(log p_ref(v) − log p_model(v)); top-1 is
the fraction of positions where both models' most likely next token agree.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibration.group import Group, ordered_total
from lowbit.errors import LowbitError

_CHUNK = 512  # positions per KL chunk: bounds the (positions, vocab) temporaries


@dataclass
class Scores:
    """Running sums for one model over the evaluated windows."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    count: int = 0

    @property
    def ppl(self) -> float:
        if not self.count:
            return float("nan")
        try:
            return math.exp(self.nll / self.count)
        except OverflowError:  # a mean loss past ~709 nats: a broken model, not an error
            return float("inf")

    @property
    def mean_kl(self) -> float:
        """The mean KL; a sum rounded below 0 (identical models) is 0, NaN stays NaN."""
        if not self.count:
            return float("nan")
        kl = self.kl / self.count
        return 0.0 if kl < 0 else kl

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.count if self.count else float("nan")


def _log_probs(model: nn.Module, window: Tensor) -> Tensor:
    """Next-token log-probabilities (T-1, V) for one window (T,)."""
    out = model(window.unsqueeze(0), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    return F.log_softmax(logits[0, :-1].float(), dim=-1)


def kl_top1(ref_logp: Tensor, logp: Tensor) -> tuple[float, float]:
    """Sums over positions of KL(ref ‖ model) and of top-1 agreement, from (N, V) next-token
    log-probabilities of the same N positions (the evaluation's and the server's monitor's)."""
    kl = top1 = 0.0
    for i in range(0, logp.shape[0], _CHUNK):
        r, q = ref_logp[i : i + _CHUNK], logp[i : i + _CHUNK]
        kl += (r.exp() * (r - q)).sum(dtype=torch.float64).item()  # terms of both signs
        top1 += (r.argmax(-1) == q.argmax(-1)).sum().item()
    return kl, top1


def _window(logp: Tensor, targets: Tensor, ref_logp: Tensor | None) -> list[float]:
    """One window's [NLL sum, KL sum, top-1 matches, predicted tokens]."""
    nll = -logp.gather(1, targets.unsqueeze(1)).sum().item()
    kl, top1 = (0.0, 0.0) if ref_logp is None else kl_top1(ref_logp, logp)
    return [nll, kl, top1, float(targets.numel())]


def _scores(rows: Tensor) -> Scores:
    """Scores from per-window rows (windows, 4), added in window order."""
    nll, kl, top1, count = (ordered_total(col) for col in rows.T.tolist())
    return Scores(nll, kl, int(top1), int(count))


@torch.inference_mode()
def score_models(
    models: dict[str, nn.Module],
    windows: Tensor,
    ref: nn.Module | None = None,
    progress: bool = True,
    group: Group | None = None,
) -> tuple[dict[str, Scores], dict[str, float]]:
    """Score every model on every window (the reference's pass is shared); returns the scores
    and each model's own seconds (its passes and scoring; the shared reference pass counts
    only for the model that is the reference). A model that *is* the reference reuses its
    log-probabilities. Under a process ``group`` (default: the initialised one, if any) each
    rank scores every world-th window and the per-window sums are gathered and added in window
    order: the figures equal one process's."""
    group = group or Group.current()
    if group.distributed:  # ranks adding up sums of different windows would print nonsense
        digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes())
        group.check_same({"windows": digest.hexdigest()}, "evaluation windows")
    rows = {name: torch.zeros(len(windows), 4, dtype=torch.float64) for name in models}
    spent = dict.fromkeys(models, 0.0)
    mine = group.mine(len(windows))
    bar = tqdm(mine, desc="evaluate", unit="window", disable=not progress)
    for k in bar:
        window = windows[k]
        targets = window[1:]
        start = time.perf_counter()
        ref_logp = _log_probs(ref, window) if ref is not None else None
        shared = time.perf_counter() - start
        for name, model in models.items():
            start = time.perf_counter()
            logp = ref_logp if model is ref else _log_probs(model, window)
            if ref_logp is not None and logp.shape[-1] != ref_logp.shape[-1]:
                raise LowbitError(f"{name} scores {logp.shape[-1]} tokens and the reference "
                                  f"{ref_logp.shape[-1]}: they do not share a vocabulary (is "
                                  f"it a quantized form of the reference?)")  # fmt: skip
            rows[name][k] = torch.tensor(_window(logp, targets, ref_logp), dtype=torch.float64)
            spent[name] += time.perf_counter() - start + (shared if model is ref else 0.0)
        bar.set_postfix({n: f"{_scores(r).ppl:.2f}" for n, r in rows.items()})
    scores = {name: _scores(group.sum(r)) for name, r in rows.items()}
    return scores, spent


@dataclass
class EvalResult:
    """One model's figures, with everything needed to read them (corpus, seqlen, tokens)."""

    model: str
    corpus: str
    corpus_sha256: str
    seqlen: int
    windows: int
    tokens: int  # tokens fed (windows x seqlen)
    predicted: int  # tokens scored (windows x (seqlen - 1))
    ppl: float
    kl: float | None
    top1: float | None
    seconds: float  # this model's own scoring time

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for key in ("ppl", "kl", "top1", "seconds"):
            if out[key] is not None:  # significant digits: a KL of 5e-7 is not 1e-6
                out[key] = float(f"{out[key]:.7g}")
        return out
