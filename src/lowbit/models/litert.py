"""A ``.tflite`` written by ``lowbit export --format litert``, run in the LiteRT interpreter.

:class:`LiteRTModel` is what every scoring and timing path takes: ``model(input_ids).logits``
through the file's ``forward`` signature (windows of its exported length), ``config`` and the
tokenizer from the file's metadata, and the interpreter for the runtime's prefill/decode
(:mod:`lowbit.runtime.litert_forward`). XNNPACK, LiteRT's default CPU delegate, runs it.
"""

from __future__ import annotations

import json
import mmap
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError

INFO_KEY, TOKENIZER_KEY = "lowbit", "lowbit_tokenizer"


def read_metadata(path: Path) -> dict[str, bytes]:
    """The file's metadata entries (name -> bytes), read without loading the weights."""
    try:
        from ai_edge_litert import schema_py_generated as fb
    except ImportError:
        raise LowbitError(
            "running a .tflite needs ai-edge-litert: pip install 'lowbit[litert]'"
        ) from None
    if Path(path).stat().st_size == 0:
        raise LowbitError(f"{path}: an empty file, not a LiteRT flatbuffer")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            model = fb.Model.GetRootAs(data, 0)
            out = {}
            for i in range(model.MetadataLength()):
                meta = model.Metadata(i)
                buf, at = model.Buffers(meta.Buffer()), model.Buffers(meta.Buffer()).Offset()
                raw = data[at : at + buf.Size()] if at else buf.DataAsNumpy().tobytes()
                out[meta.Name().decode()] = bytes(raw)
        except Exception as exc:  # a damaged or foreign file: the flatbuffer reader's own error
            raise LowbitError(f"{path}: not a readable LiteRT flatbuffer ({exc})") from None
    return out


def open_interpreter(path: Path, threads: int | None = None) -> Any:
    """LiteRT's interpreter on the file ``path`` (a truncated file is a one-line error: the
    interpreter's verifier refuses it with a ValueError)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_path=str(path), num_threads=threads or torch.get_num_threads())
    except ValueError as exc:
        raise LowbitError(f"{path}: not a readable LiteRT flatbuffer ({exc})") from None


class LiteRTModel(nn.Module):
    """The model in a lowbit ``.tflite``: ``forward(input_ids)`` -> ``.logits``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        meta = read_metadata(self.path)
        if INFO_KEY not in meta:
            raise LowbitError(f"{path} was not written by lowbit export (no lowbit metadata); "
                              "score files lowbit exported")  # fmt: skip
        from transformers import AutoConfig

        try:  # the file is the user's: its metadata is data, checked, never code
            self.info = json.loads(meta[INFO_KEY])
            cfg = dict(self.info["config"])
            self.config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            self.seqlen = int(self.info["signatures"]["forward"]["seqlen"])
            decode = self.info["signatures"].get("decode")  # generation ends at the cache's end
            self.generation_limit = int(decode["cache"]) if decode else None
            self.tokenizer_files: dict[str, str] = json.loads(meta.get(TOKENIZER_KEY, b"{}"))
        except (ValueError, KeyError, TypeError) as exc:
            raise LowbitError(f"{path}: its lowbit metadata is damaged ({exc!r})") from None
        self.interpreter = open_interpreter(self.path, threads)
        self.generation_config = _generation_config(self.tokenizer_files, self.config)
        # no torch weights: a zero-size parameter tells device-probing callers "cpu"
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids: Tensor, use_cache: bool = False, **_: Any) -> SimpleNamespace:
        if input_ids.shape[1] != self.seqlen:
            raise LowbitError(
                f"{self.path.name} scores windows of {self.seqlen} tokens (its export's "
                f"--seqlen), not {input_ids.shape[1]}; evaluate with --seqlen {self.seqlen}"
            )
        # a runner per call: a live one holds the interpreter, which then refuses the
        # in-place decode of lowbit.runtime.litert_forward
        run = self.interpreter.get_signature_runner("forward")
        rows = [run(input_ids=row[None].numpy().astype(np.int32))["logits"] for row in input_ids]
        del run
        return SimpleNamespace(logits=torch.from_numpy(np.concatenate(rows)))

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def tokenizer(self) -> Any:
        """The tokenizer stored in the file (None if it has none)."""
        if "tokenizer.json" not in self.tokenizer_files:
            return None
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, text in self.tokenizer_files.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def _generation_config(files: dict[str, str], config: Any) -> Any:
    """The exported folder's generation settings (its end-of-turn ids), else the config's."""
    from transformers import GenerationConfig

    if "generation_config.json" in files:
        try:
            return GenerationConfig.from_dict(json.loads(files["generation_config.json"]))
        except (ValueError, TypeError):
            pass  # damaged: the config's own ids below
    return GenerationConfig.from_model_config(config)
