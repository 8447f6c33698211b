"""An image model's ``.tflite`` written by ``lowbit export --format litert``, run in the LiteRT
interpreter as an ``nn.Module``: ``model(x)`` for a batch of inputs of the exported shape, so
``lowbit eval`` scores and times the file as it scores the folder it came from.

The file holds one fixed input shape (batch 1, the image model's evaluation input at export);
each row of a batch is one interpreter call. XNNPACK, LiteRT's default CPU delegate, runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.litert import INFO_KEY, open_interpreter, read_metadata


def image_info(path: Path) -> dict | None:
    """The lowbit metadata of an image model's ``.tflite`` (``model``: its image zoo name,
    ``input``: the exported input shape), or None for any other file (a language model's)."""
    raw = read_metadata(path).get(INFO_KEY)
    try:
        info = json.loads(raw) if raw is not None else None
    except ValueError:
        raise LowbitError(f"{path}: its lowbit metadata is damaged") from None
    if not isinstance(info, dict) or "config" in info or "model" not in info:
        return None
    shape = info.get("input")
    if not (isinstance(info["model"], str) and isinstance(shape, list) and len(shape) >= 2
            and all(isinstance(n, int) and n > 0 for n in shape)):  # fmt: skip
        raise LowbitError(f"{path}: its lowbit metadata is damaged (model or input shape)")
    return info


class LiteRTImageModel(nn.Module):
    """``forward(x)``: x (N, *input shape) float -> the file's outputs (N, ...)."""

    def __init__(self, path: str | Path, info: dict, threads: int | None = None) -> None:
        super().__init__()
        self.path, self.name = Path(path), info["model"]
        self.input_shape = tuple(info["input"][1:])
        self.interpreter = open_interpreter(self.path, threads)
        self.runner = self.interpreter.get_signature_runner()
        (self.input_name,) = self.interpreter.get_signature_list()["serving_default"]["inputs"]
        # no torch weights: a zero-size parameter tells device-probing callers "cpu"
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise LowbitError(f"{self.path.name} takes inputs of shape {self.input_shape} (its "
                              f"export's), not {tuple(x.shape[1:])}")  # fmt: skip
        rows = []
        for row in x.detach().float().numpy():
            (out,) = self.runner(**{self.input_name: row[None]}).values()
            rows.append(np.array(out))  # a copy: the interpreter reuses its output buffer
        return torch.from_numpy(np.concatenate(rows))

    def file_bytes(self) -> int:
        return self.path.stat().st_size
