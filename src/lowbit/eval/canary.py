"""Canary prompts: does a deployed model still answer as it did when it was quantized?

At quantize time a few fixed windows of tokens (text when the model has a tokenizer, plus one
window of seeded random token ids) go through the *float* model, and its top-``k`` next-token
log-probabilities at every position are stored beside the quantized weights
(``canary.safetensors``). The quantized folder, loaded as a user loads it, is then scored on
the same windows: KL(float ‖ quantized) over the top-``k`` tokens plus one bucket for the rest
of the vocabulary (a lower bound of the full KL that needs no float model at check time) and
top-1 agreement. Its tolerance, recorded in the manifest, is that measured KL times
:data:`MARGIN` plus :data:`FLOOR`. Later, ``lowbit monitor`` and ``lowbit serve`` score the
deployed model again; a KL above the tolerance means the model no longer computes what was
validated (damaged weights, a different kernel path, a broken runtime).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowbit.assets import sha256_file
from lowbit.assets.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.models.modules import context_limit

FILE = "canary.safetensors"
TOP_K = 32
WINDOWS = 4  # text windows (at most WINDOWS - 1) and one of random ids
WINDOW_TOKENS = 64
MARGIN = 1.5  # tolerance = MARGIN * KL measured at quantize time + FLOOR
FLOOR = 1e-4  # nats: well above float reassociation between kernels, far below damage

# Short texts of different kinds (prose, code, arithmetic, dialogue, a list, other languages),
# written for lowbit; they share nothing with the calibration or evaluation corpora.
PROMPTS = (
    "The lighthouse keeper climbed the stairs at dusk, counting the steps as he always did, "
    "and wondered whether the supply boat would reach the island before the storm.",
    "def moving_average(values, width):\n    total = sum(values[:width])\n    out = [total / "
    "width]\n    for i in range(width, len(values)):\n        total += values[i] - values[i - "
    "width]\n        out.append(total / width)\n    return out\n",
    "Question: A train leaves at 9:40 and the journey takes 2 hours 35 minutes. When does it "
    "arrive? Answer: 9:40 plus 2 hours is 11:40, plus 35 minutes is 12:15.",
    "User: Can you suggest a quick dinner with rice and eggs?\nAssistant: Fried rice works "
    "well: warm the rice, scramble two eggs, add soy sauce, spring onions and peas.",
    "Ingredients for bread: 500 g flour, 350 ml water, 10 g salt, 7 g yeast. Mix, rest for an "
    "hour, fold, shape and bake at 230 degrees for thirty-five minutes.",
    "Le musée ouvre à dix heures. Die Brücke wurde 1890 gebaut. El río cruza la ciudad de "
    "norte a sur. La biblioteca è chiusa il lunedì.",
)


@dataclass
class Canary:
    """The float model's answer on the canary windows: ``tokens`` (N, T), and at each position
    the ``top_ids`` (N, T, k) and ``top_logp`` (N, T, k) of its next-token distribution."""

    tokens: Tensor
    top_ids: Tensor
    top_logp: Tensor

    @classmethod
    def from_logits(cls, tokens: Tensor, logits: Tensor, k: int = TOP_K) -> Canary:
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return cls(tokens, top.indices.to(torch.int32), top.values)

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's sha256."""
        with atomic_file(path) as tmp:
            tensors = {"tokens": self.tokens.to(torch.int64).contiguous(),
                       "top_ids": self.top_ids.contiguous(),
                       "top_logp": self.top_logp.float().contiguous()}  # fmt: skip
            save_file(tensors, str(tmp))
        return sha256_file(path)

    @classmethod
    def load(cls, path: Path) -> Canary:
        try:
            t = load_file(str(path))
            canary = cls(t["tokens"], t["top_ids"], t["top_logp"])
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            raise LowbitError(f"{path}: not a lowbit canary file ({exc})") from None
        n, length = canary.tokens.shape
        if canary.top_ids.shape[:2] != (n, length) or canary.top_ids.shape != canary.top_logp.shape:
            raise LowbitError(f"{path}: canary tensors disagree in shape")
        return canary

    def score(self, logits: Tensor) -> tuple[float, float]:
        """Mean KL(float ‖ model) over top-k + rest buckets and top-1 agreement, per position,
        from the model's ``logits`` (N, T, V) on :attr:`tokens`."""
        logq = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
        ids = self.top_ids.long()
        if int(ids.max()) >= logq.shape[-1]:
            raise LowbitError("the canary names tokens beyond this model's vocabulary")
        p, q = self.top_logp.exp(), logq.gather(-1, ids).exp()  # (N, T, k)
        p_rest = (1 - p.sum(-1)).clamp_min(0)  # (N, T)
        q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
        kl = (p * (self.top_logp - q.clamp_min(1e-30).log())).sum(-1)
        rest = p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log())
        kl = kl + torch.where(p_rest > 0, rest, 0)
        top1 = (logq.argmax(-1) == ids[..., 0]).float()
        return float(kl.clamp_min(0).mean()), float(top1.mean())


@dataclass
class CanaryCheck:
    """One check of a model against its canary: measured now vs the recorded tolerance."""

    kl: float
    top1: float
    tolerance: float
    recorded_kl: float | None

    @property
    def ok(self) -> bool:
        return self.kl <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "degraded", "kl": self.kl, "top1": self.top1,
                "tolerance": self.tolerance, "recorded_kl": self.recorded_kl}  # fmt: skip

    def line(self) -> str:
        recorded = "" if self.recorded_kl is None else f", {self.recorded_kl:.3g} when quantized"
        verdict = "ok" if self.ok else "DEGRADED"
        return (f"canary: KL {self.kl:.3g} nats/token (tolerance {self.tolerance:.3g}{recorded}),"
                f" top-1 {100 * self.top1:.1f}%: {verdict}")  # fmt: skip


def canary_tokens(tokenizer: Any, vocab: int, context: int, seed: int = 0) -> Tensor:
    """The canary windows (N, T): up to WINDOWS - 1 of :data:`PROMPTS` text (with a
    tokenizer), then seeded random ids to fill WINDOWS windows of min(WINDOW_TOKENS, context)."""
    length = max(2, min(WINDOW_TOKENS, context))
    rows: list[Tensor] = []
    if tokenizer is not None:
        ids = tokenizer("\n\n".join(PROMPTS), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([i for i in ids if 0 <= i < vocab], dtype=torch.long)
        usable = min(WINDOWS - 1, len(ids) // length)
        rows += list(ids[: usable * length].view(usable, length)) if usable else []
    generator = torch.Generator().manual_seed(seed)
    while len(rows) < WINDOWS:
        rows.append(torch.randint(0, vocab, (length,), generator=generator))
    return torch.stack(rows)


def model_canary_tokens(model: nn.Module, tokenizer: Any) -> Tensor:
    """:func:`canary_tokens` for a language model's vocabulary and context."""
    return canary_tokens(tokenizer, model.config.vocab_size, context_limit(model.config) or 64)


@torch.inference_mode()
def model_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    """(N, T, V) float32 logits of ``model`` on ``tokens`` (N, T), one window at a time."""
    rows = []
    for row in tokens:
        out = model(input_ids=row.unsqueeze(0), use_cache=False)
        rows.append((out.logits if hasattr(out, "logits") else out)[0].float())
    return torch.stack(rows)


def tolerance(kl: float) -> float:
    return MARGIN * kl + FLOOR


def measure(canary: Canary, quantized: Tensor) -> dict[str, Any]:
    """The manifest's ``canary`` entry (less the file) from the ``quantized`` model's logits
    (N, T, V) on the canary's tokens: its KL and top-1, and the tolerance they set."""
    kl, top1 = canary.score(quantized)
    n, length, k = canary.top_ids.shape
    return {"windows": n, "tokens": length, "top_k": k, "kl": kl, "top1": top1,
            "tolerance": tolerance(kl), "rule": f"{MARGIN} * kl + {FLOOR}"}  # fmt: skip


def write(canary: Canary, entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write ``canary`` into ``folder``; returns the manifest entry naming it."""
    return {"file": FILE, "sha256": canary.save(folder / FILE), **entry}


def check(model: nn.Module, folder: Path, manifest: dict[str, Any],
          tol: float | None = None) -> Any:  # fmt: skip
    """Score ``model`` (loaded from ``folder``) against the canary its manifest records: a
    :class:`CanaryCheck`, or an image model's ``ImageCanaryCheck`` (``tol`` then the least
    PSNR in dB)."""
    entry = manifest.get("canary")
    if not entry:
        raise LowbitError(f"{folder} records no canary prompts (`lowbit quantize` records them "
                          f"unless --no-canary, and `lowbit qat`; not the Python API's save "
                          f"or older lowbit versions); compare against the float model with "
                          f"`lowbit eval --ref` or `lowbit serve --ref` instead")  # fmt: skip
    path = Path(folder) / entry.get("file", FILE)
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise LowbitError(f"{path} is missing or does not match the sha256 in the manifest")
    if entry.get("kind") == "image":  # an image model's (lowbit.eval.canary_image)
        from lowbit.eval.canary_image import check_image

        return check_image(model, path, entry, tol)
    canary = Canary.load(path)
    kl, top1 = canary.score(model_logits(model, canary.tokens))
    limit = float(entry["tolerance"]) if tol is None else tol
    return CanaryCheck(kl, top1, limit, entry.get("kl"))


__all__ = ["FILE", "Canary", "CanaryCheck", "canary_tokens", "check", "measure", "model_logits",
           "tolerance", "write"]  # fmt: skip
