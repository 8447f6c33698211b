"""Export a lowbit folder to the formats runtimes load: compressed-tensors, GGUF, ONNX, LiteRT.

Every exporter reads the saved packed layers (never the kernels' layouts), maps them exactly to
the target's encoding or stops with an error naming the layer and the reason, and writes into a
temporary path that is renamed into place only when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.assets import atomic_dir, atomic_file, prepare_out
from lowbit.errors import LowbitError
from lowbit.models import load_folder, read_manifest, zoo
from lowbit.models.experts import LinearExperts
from lowbit.nn.attention import drop_key_centers

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gguf", "onnx", "litert")
FILE_FORMATS = ("gguf", "litert")  # one file; the others write a folder


@dataclass
class LiteRTOptions:
    """The signatures of a LiteRT export: a ``forward`` over windows of ``seqlen`` tokens, and
    with ``kv_cache`` ``prefill`` (chunks of ``prefill`` tokens) and ``decode`` over a cache
    of ``cache`` slots."""

    seqlen: int | None = None  # None: 2048, or the model's context if shorter
    kv_cache: bool = False
    prefill: int = 128
    cache: int | None = None  # None: 1024, or the model's context if shorter


@dataclass
class ExportResult:
    format: str
    path: Path
    bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": self.format, "path": str(self.path), "bytes": self.bytes}


def export(
    folder: str | Path,
    fmt: str,
    out: str | Path,
    overwrite: bool = False,
    float_type: str = "f16",
    requantize: str | None = None,
    litert: LiteRTOptions | None = None,
) -> ExportResult:
    """Export the lowbit folder ``folder`` as ``fmt`` to ``out`` (a folder for
    compressed-tensors and ONNX, a file for GGUF and LiteRT)."""
    folder, out = Path(folder), Path(out)
    if fmt not in FORMATS:
        raise LowbitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    manifest = read_manifest(folder)
    if (manifest.get("source") or {}).get("kind") == "image":
        return _export_image(folder, manifest, fmt, out, overwrite)
    rotate = (manifest.get("recipe") or {}).get("rotate")
    online = (rotate or {}).get("online")
    if online and fmt != "onnx":  # ONNX graphs hold the transform as plain ops
        raise LowbitError(f"{folder} turns the inputs of {', '.join(online)} at run time "
                          f"(rotate.online); {fmt} files cannot hold that transform: export "
                          f"to onnx, or quantize without rotate.online")  # fmt: skip
    prepare_out(out, overwrite, folder=fmt not in FILE_FORMATS, inputs=(folder,))
    if requantize is not None and fmt not in FILE_FORMATS:
        raise LowbitError("--requantize applies to GGUF and LiteRT export only")
    model, _ = load_folder(folder)
    if rotate is not None and _turns_post_norms(model):
        raise LowbitError(f"{folder} turns its post-norms' outputs at run time (a rotation of "
                          f"a model that normalises its sub-blocks' outputs); {fmt} files "
                          f"cannot hold that transform: quantize it without rotate to "
                          f"export it")  # fmt: skip
    if fmt in ("onnx", "litert") and any(isinstance(m, LinearExperts) for m in model.modules()):
        raise LowbitError(f"{folder} is a mixture of experts, whose routing picks the weights "
                          f"each token reads: lowbit's {fmt} graphs do not hold that; export "
                          f"compressed-tensors (vLLM, transformers)")  # fmt: skip
    attention = (manifest.get("recipe") or {}).get("attention")
    if attention is not None:  # weights only: the target's runtime keeps its own cache
        drop_key_centers(model)
        log.warning("%s rounds its key/value cache at run time (%s); the %s file holds the "
                    "weights only: set the target runtime's own cache type (llama.cpp: "
                    "--cache-type-k/-v)", folder, attention, fmt)  # fmt: skip
    if fmt == "litert":
        from lowbit.export.litert_file import write_litert

        opts = litert or LiteRTOptions()
        with atomic_file(out) as tmp:
            types = write_litert(model, folder, tmp, opts.seqlen, opts.kv_cache, opts.prefill,
                                 opts.cache, requantize)  # fmt: skip
        return ExportResult(fmt, out, out.stat().st_size, types)
    if fmt == "gguf":
        from lowbit.export.gguf_file import write_gguf

        with atomic_file(out) as tmp:
            types = write_gguf(model, folder, tmp, _source_gguf(manifest), float_type, requantize)
        return ExportResult(fmt, out, out.stat().st_size, types)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if fmt == "compressed-tensors":
            from lowbit.export.compressed import write_compressed_tensors

            write_compressed_tensors(model, folder, tmp)
        else:
            from lowbit.export.onnx_file import write_onnx

            write_onnx(model, folder, tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportResult(fmt, out, size)


def _export_image(folder: Path, manifest: dict, fmt: str, out: Path,
                  overwrite: bool) -> ExportResult:  # fmt: skip
    """A quantized image model: ONNX (QDQ convolutions) or LiteRT (weight-only codes, or full
    integer for a W8A8 model, at the shape of the model's first evaluation input)."""
    if fmt not in ("onnx", "litert"):
        raise LowbitError(f"{folder} is an image model: it exports to onnx (QDQ convolutions) "
                          f"or litert, not {fmt}")  # fmt: skip
    from lowbit.export.onnx_image import write_onnx_image
    from lowbit.models.images import image_models
    from lowbit.models.load import load_model

    name = manifest["source"]["model"]
    prepare_out(out, overwrite, folder=fmt == "onnx", inputs=(folder,))
    model = load_model(str(folder), kernels=False).model
    if getattr(model, "repeats_layers", False):
        raise LowbitError(f"{name} is a sampling loop (its layers run once per step); {fmt} "
                          f"export takes models that run each layer once")  # fmt: skip
    entry = image_models()[name]
    example, _ = entry.evaluation()
    if fmt == "litert":
        from lowbit.export.litert_image import write_litert_image
        from lowbit.export.litert_int8 import write_litert_int8
        from lowbit.nn import QuantLinear

        rounded = any(isinstance(m, QuantLinear) and m.act is not None for m in model.modules())
        with atomic_file(out) as tmp:
            if rounded:  # W8A8: int8 tensors between the layers
                types = write_litert_int8(model, example[:1], entry.calibration(), name, tmp)
            else:
                types = write_litert_image(model, example[:1], name, tmp)
        return ExportResult(fmt, out, out.stat().st_size, types)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_onnx_image(model, example, name, folder, tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportResult(fmt, out, size)


def _source_gguf(manifest: dict) -> Path | None:
    """The GGUF the model was loaded from (its tokenizer is copied verbatim), if any."""
    source = manifest.get("source") or {}
    kind, name = source.get("kind"), source.get("model")
    if kind == "zoo" and name in zoo():
        from lowbit.models.zoo import zoo_gguf

        return zoo_gguf(zoo()[name])
    if kind == "gguf" and name and Path(name).expanduser().is_file():
        return Path(name).expanduser()
    return None


def _turns_post_norms(model) -> bool:
    """Whether a rotated model turns its post-norms' outputs at run time (its blocks normalise
    their sub-blocks' outputs: :func:`lowbit.models.rotate.install_online_rotations`)."""
    from lowbit.models.families import find_blocks
    from lowbit.models.rotate_fit import norm_layout

    return bool(norm_layout(find_blocks(model)[1][0])[1])
