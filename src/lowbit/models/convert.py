"""GGUF file -> Hugging Face safetensors folder, once, cached and verified.

The conversion goes tensor by tensor over the memory-mapped GGUF file with transformers' own
GGUF tables (config, tokenizer, tensor names, un-permuting) and the ``gguf`` package's
dequantizers, writing one shard per decoder block, so converting a model larger than RAM works.
The folder records the sha256 of the GGUF it came from and of its own weight files; a folder
that fails either check is rebuilt.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch

from lowbit.assets import atomic_dir, cache_dir, sha256_file, verified
from lowbit.errors import LowbitError, reason
from lowbit.models.checkpoint import block_units, write_unit_shards

log = logging.getLogger(__name__)

_STAMP = "lowbit-source.json"
_CONVERTER = 2  # tensor by tensor, sharded; folders from another converter are rebuilt


def converted_folder(gguf: Path, gguf_sha256: str | None = None) -> Path:
    """A verified HF folder holding the float weights and tokenizer of ``gguf``."""
    gguf_sha256 = gguf_sha256 or sha256_file(gguf)
    folder = cache_dir() / "converted" / f"{gguf.stem}-{gguf_sha256[:12]}"
    if _folder_ok(folder, gguf_sha256):
        return folder
    log.info("converting %s to a safetensors folder, tensor by tensor (once)", gguf.name)
    with atomic_dir(folder, overwrite=True) as tmp:
        _convert(gguf, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        stamp = {"gguf_sha256": gguf_sha256, "converter": _CONVERTER, "weights_sha256": files}
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
    return folder


def _folder_ok(folder: Path, gguf_sha256: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stamp.get("gguf_sha256") != gguf_sha256 or stamp.get("converter") != _CONVERTER:
        return False
    ok = all(verified(folder / name, sha) for name, sha in stamp["weights_sha256"].items())
    if not ok:
        log.warning("cached conversion %s is corrupt or truncated; converting again", folder.name)
    return ok


def _convert(gguf: Path, folder: Path) -> None:
    """Write ``gguf`` as an HF folder one decoder block at a time: each tensor is read from the
    memory-mapped file, dequantized (to float32; float16/bfloat16/float32 tensors stay as
    stored), renamed and un-permuted by transformers' own GGUF tables, and written; the model is
    never in memory as a whole."""
    import numpy as np
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    try:
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)  # metadata only
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                            trust_remote_code=False)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  trust_remote_code=False)  # fmt: skip
        reader = GGUFReader(gguf)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, IndexError, EOFError,
            struct.error) as exc:  # what the readers raise on a damaged or cut file  # fmt: skip
        raise LowbitError(f"could not read GGUF file {gguf} (damaged, or cut short by an "
                          f"interrupted download?): {reason(exc)}") from None  # fmt: skip
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    to_hf = get_gguf_hf_weights_map(model, processor)
    by_name = {}
    for t in reader.tensors:
        if t.name in to_hf:
            by_name[to_hf[t.name]] = t
    expected = set(model.state_dict()) - _tied(model)
    missing = sorted(expected - set(by_name))
    if missing:
        raise LowbitError(f"GGUF file {gguf} lacks tensors the model needs: {missing[:3]}")

    def tensor(name: str) -> torch.Tensor:
        t = by_name[name]
        raw = dequantize(t.data, t.tensor_type)
        weights = processor.process(weights=raw, name=t.name, tensor_key_mapping=to_hf,
                                    parsed_parameters={}).weights  # fmt: skip
        out = torch.from_numpy(np.ascontiguousarray(weights))
        return out if out.dtype in (torch.float16, torch.float32) else out.float()

    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_unit_shards(folder, block_units(model, sorted(by_name, key=_order(model))), tensor)


def _tied(model: torch.nn.Module) -> set[str]:
    from lowbit.models.source import tied_names

    return tied_names(model)


def _order(model: torch.nn.Module):
    """Sort key: the model's own tensor order."""
    position = {n: i for i, n in enumerate(model.state_dict())}
    return lambda name: position.get(name, len(position))
