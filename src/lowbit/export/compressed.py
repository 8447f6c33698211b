"""compressed-tensors export: the HF folder layout that transformers and vLLM load.

Weight-only integer layers become ``pack-quantized`` tensors (``weight_packed`` int32, dense
cross-element packing by the library's own ``pack_to_int32``; ``weight_scale``; ``weight_shape``;
``weight_zero_point`` for asymmetric grids with integer zero points). W8A8 layers become
``int-quantized`` (``weight`` int8 + ``weight_scale``) with a per-token dynamic activation scheme.

The mapping is exact: compressed-tensors dequantizes x = (q - z) * s with signed codes q, which is
lowbit's x = (u - mid) * s (symmetric) or (u - z) * s (``zero_point: int``) shifted by 2**(bits-1).
lowbit's default asymmetric grid stores a float offset (x = u * s + m, as GGUF's Q4_1 does); that
has no compressed-tensors twin, and exporting it is an error that names the layer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.kernels.int8 import int8_eligible
from lowbit.models.experts import stored_expert_names
from lowbit.nn import QuantLinear

log = logging.getLogger("lowbit")


def _pack_to_int32(codes: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes, bits, packed_dim=packed_dim)


def weight_args(spec: WeightSpec, layer: str) -> dict[str, Any]:
    """The compressed-tensors ``weights`` scheme of a lowbit weight spec, or a clear error."""
    qt = spec.qtype
    if spec.lorc_rank:
        raise LowbitError(f"{layer}: the LoRC correction has no compressed-tensors twin")
    if qt.kind != "int":
        raise LowbitError(f"{layer}: {qt.name} weights have no compressed-tensors integer twin "
                          "(export int2..int8 recipes)")  # fmt: skip
    if not spec.symmetric and spec.zero_point != "int":
        raise LowbitError(
            f"{layer}: an asymmetric grid with float offsets (x = u*s + m) has no "
            "compressed-tensors twin; quantize with `symmetric: true` or `zero_point: int`"
        )
    if spec.granularity not in ("group", "channel"):
        raise LowbitError(f"{layer}: {spec.granularity} granularity is not exported to "
                          "compressed-tensors (use group or channel)")  # fmt: skip
    args: dict[str, Any] = {
        "num_bits": qt.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False,
        "strategy": spec.granularity,
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "observer": None,
    }  # fmt: skip
    return args


def activation_args(act: ActivationSpec, layer: str) -> dict[str, Any]:
    if not (act.bits == 8 and act.dynamic and act.granularity == "token" and act.symmetric):
        raise LowbitError(f"{layer}: only 8-bit symmetric per-token dynamic activations are "
                          f"exported to compressed-tensors, not {act.short()}")  # fmt: skip
    return {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
            "strategy": "token", "observer": None}  # fmt: skip


def layer_tensors(name: str, mod: QuantLinear) -> dict[str, Tensor]:
    """The compressed tensors of one QuantLinear (names prefixed by the module name)."""
    spec, bits = mod.spec, mod.spec.qtype.bits
    codes = mod.codes().to(torch.int16)  # (out, in) unsigned codes
    offset = spec.qtype.mid
    signed = (codes - offset).to(torch.int8)
    scale = mod.scale.reshape(mod.out_features, -1)  # (out, groups)
    out = {f"{name}.weight_scale": scale.contiguous()}
    if mod.act is not None:
        out[f"{name}.weight"] = signed.contiguous()
    else:
        out[f"{name}.weight_packed"] = _pack_to_int32(signed, bits)
        out[f"{name}.weight_shape"] = torch.tensor([mod.out_features, mod.in_features])
    if not spec.symmetric:
        zero = (mod.qparams().zero.to(torch.int16) - offset).to(torch.int8)
        zero = zero.reshape(mod.out_features, -1)
        out[f"{name}.weight_zero_point"] = _pack_to_int32(zero, bits, packed_dim=0)
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.detach().contiguous()
    return out


def quantization_config(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """(``quantization_config``, names of quantized layers), grouped by scheme."""
    groups: dict[str, dict[str, Any]] = {}
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        if getattr(mod, "stored_transposed", False):
            # transformers and vLLM decompress into nn.Linear layers only: a loader finds no
            # nn.Linear here and silently leaves the layer's weight random
            raise LowbitError(f"{name} is a GPT-2-style Conv1D layer (its weight stored as "
                              "(in, out)), which compressed-tensors loaders do not decompress; "
                              "export this model to ONNX instead")  # fmt: skip
        scheme = {"weights": weight_args(mod.spec, name)}
        if mod.act is not None:
            if not int8_eligible(mod.spec, mod.act):
                raise LowbitError(f"{name}: compressed-tensors export covers W8A8 (int8 symmetric "
                                  f"per-channel weights, 8-bit per-token dynamic inputs), not "
                                  f"{mod.spec.short()} with {mod.act.short()}")  # fmt: skip
            scheme["input_activations"] = activation_args(mod.act, name)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
        names.append(name)
    if not names:
        raise LowbitError("the model has no quantized layers to export")
    formats = {"int-quantized" if "input_activations" in g else "pack-quantized"
               for g in groups.values()}  # fmt: skip
    if len(formats) > 1:
        raise LowbitError("W8A8 and weight-only layers in one model cannot share one "
                          "compressed-tensors format; export them separately")  # fmt: skip
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop(),
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "producer": "lowbit",
    }
    return config, names


def write_compressed_tensors(model: nn.Module, folder: Path, tmp: Path) -> None:
    """Write config.json + model.safetensors (+ tokenizer files copied from ``folder``) to
    ``tmp``; ``model`` is the lowbit model loaded from ``folder`` without kernels."""
    from safetensors.torch import save_file

    qconfig, names = quantization_config(model)
    state: dict[str, Tensor] = {}
    quantized = set(names)
    if any(not model.get_submodule(n).spec.symmetric for n in names):
        # checked: compressed-tensors' own decompressor reads such a file back to lowbit's
        # weights, but transformers 5.25's loader (with compressed-tensors 0.20) refuses the
        # packed zero points' shape
        log.warning("asymmetric layers with integer zero points: compressed-tensors reads them, "
                    "but transformers (5.25, compressed-tensors 0.20) cannot load them yet; "
                    "for transformers, export a symmetric recipe")  # fmt: skip
    subclasses = sorted(
        {getattr(model.get_submodule(n), "linear_class", None) for n in names} - {None}
    )
    if subclasses:
        # checked: transformers 5.25 swaps the tensors of a FalconLinear but keeps its forward,
        # which reads .weight: loading fails (an AttributeError), it does not run wrong
        log.warning("the quantized layers were %s (nn.Linear subclasses with their own forward): "
                    "transformers (5.25) keeps their forward, which reads a float weight, and "
                    "cannot load this export", ", ".join(subclasses))  # fmt: skip
    for name, mod in model.named_modules():
        if name in quantized:
            state |= layer_tensors(name, mod)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized or (tied and key == "lm_head.weight"):
            continue
        state[key] = t.detach().contiguous()
    # a mixture's experts under the family's stored names, which transformers fuses on load
    stored = stored_expert_names(getattr(getattr(model, "config", None), "model_type", ""))
    state = {stored(k): t for k, t in state.items()}
    for group in qconfig["config_groups"].values():
        group["targets"] = [stored(n) for n in group["targets"]]
    qconfig["ignore"] = [stored(n) for n in qconfig["ignore"]]
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = qconfig
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    copy_side_files(folder, tmp)
    note = {"format": "compressed-tensors", "producer": "lowbit"}  # lets --overwrite replace it
    (tmp / "lowbit_export.json").write_text(json.dumps(note, indent=1), encoding="utf-8")


def copy_side_files(folder: Path, tmp: Path) -> None:
    """Tokenizer and generation files travel with every HF-style export; lowbit's own files
    do not: its config and manifest, and its weights in any form (a sharded folder's shards
    and index too: a loader that follows an index, as vLLM's does, would read them instead of
    the export's weights)."""
    import shutil

    for path in folder.iterdir():
        name = path.name
        if (name in ("config.json", "lowbit.json") or name.startswith(".") or path.is_dir()
                or name.endswith((".safetensors", ".safetensors.index.json"))):  # fmt: skip
            continue
        shutil.copy2(path, tmp / path.name)
