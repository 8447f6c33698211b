"""GGUF file -> Hugging Face safetensors folder, once, cached and verified.

transformers (>= 5, with the ``gguf`` package) reads a GGUF file and dequantizes it to float32;
that takes ~15 s for a 135M model, so the result is saved as a normal HF folder and loaded from
there afterwards (~1 s). The folder records the sha256 of the GGUF it came from and of its own
weights file; a folder that fails either check is rebuilt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lowbit.assets import atomic_dir, cache_dir, sha256_file, verified
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

_STAMP = "lowbit-source.json"


def converted_folder(gguf: Path, gguf_sha256: str | None = None) -> Path:
    """A verified HF folder holding the float32 weights and tokenizer of ``gguf``."""
    gguf_sha256 = gguf_sha256 or sha256_file(gguf)
    folder = cache_dir() / "converted" / f"{gguf.stem}-{gguf_sha256[:12]}"
    if _folder_ok(folder, gguf_sha256):
        return folder
    log.info("converting %s to a safetensors folder (once)", gguf.name)
    model, tokenizer = read_gguf(gguf)
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stamp = {
            "gguf_sha256": gguf_sha256,
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
        }
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1))
    return folder


def _folder_ok(folder: Path, gguf_sha256: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("gguf_sha256") != gguf_sha256:
        return False
    ok = verified(folder / "model.safetensors", stamp.get("weights_sha256", ""))
    if not ok:
        log.warning("cached conversion %s is corrupt or truncated; converting again", folder.name)
    return ok


def read_gguf(gguf: Path) -> tuple[torch.nn.Module, object]:
    """(float32 model, tokenizer) from a GGUF file, via transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"could not read GGUF file {gguf}: {first[:200]}") from None
    # The dequantized model is plain float32 now; drop the GGUF quantizer so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
