"""The Python API's arguments, checked where a call enters it: a plausible mistake (a path
where a model goes, a tokenizer where calibration windows go, a model quantized already) is one
``LowbitError`` naming the argument, raised before the model is touched, not a traceback from
deep inside after some of its layers were replaced."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QUANTIZED_MODULES
from lowbit.pipeline.qat import QATOptions, require_windows
from lowbit.pipeline.report import QuantizeReport


def check_model(model: Any, what: str = "model") -> None:
    """``model`` is a torch module (not a path, nor the LoadedModel that holds one)."""
    if isinstance(model, nn.Module):
        return
    hint = (" (a LoadedModel: pass its .model)" if hasattr(model, "model") and
            hasattr(model, "tokenizer") else
            "; load one with lowbit.load_model(...).model")  # fmt: skip
    raise LowbitError(f"{what}: expected a torch model (nn.Module), got "
                      f"{type(model).__name__}{hint}")  # fmt: skip


def check_float(model: nn.Module) -> None:
    """``model`` holds no quantized layer yet (quantizing it again would find nothing to do)."""
    done = sum(isinstance(m, QUANTIZED_MODULES) for m in model.modules())
    if done:
        raise LowbitError(f"the model is already quantized ({done} quantized layers); start "
                          f"from the float model")  # fmt: skip


def check_windows(windows: Any, what: str, needed: bool) -> None:
    """``windows`` is a CalibrationSet (or None where ``needed`` is False)."""
    if windows is None and not needed:
        return
    if not isinstance(windows, CalibrationSet):
        raise LowbitError(f"{what}: expected a CalibrationSet (lowbit.calibration_set(tokenizer, "
                          f"corpus, samples, seqlen)), got {type(windows).__name__}")  # fmt: skip


def check_qat_options(options: Any, train: CalibrationSet) -> QATOptions:
    """``options`` (None: the defaults) as QATOptions, with enough training windows for them."""
    options = QATOptions() if options is None else options
    if not isinstance(options, QATOptions):
        raise LowbitError(f"options: expected lowbit.QATOptions(steps=..., lr=...), got "
                          f"{type(options).__name__}")  # fmt: skip
    require_windows(options, train)
    return options


def check_report(model: nn.Module, report: Any) -> None:
    """``report`` is the QuantizeReport of ``model`` as it is now: every layer it names is one
    of the model's quantized layers, in that format (else the folder written would not load)."""
    if not isinstance(report, QuantizeReport):
        raise LowbitError(f"report: expected the QuantizeReport lowbit.quantize returned, got "
                          f"{type(report).__name__}")  # fmt: skip
    layers = dict(model.named_modules())
    for name, layer in report.layers.items():
        module = layers.get(name)
        if not isinstance(module, QUANTIZED_MODULES):
            kernel = "it runs on a kernel's layout: save a model loaded with kernels=False"
            why = kernel if hasattr(module, "kind") else "save the model quantize reported on"
            raise LowbitError(f"report: {name} is not a quantized layer of this model; {why}")
        if module.spec != layer.spec:
            raise LowbitError(f"report: {name} is {module.spec.short()} in the model and "
                              f"{layer.spec.short()} in the report; save the model with the "
                              f"report of its own quantization")  # fmt: skip


def check_vocabulary(models: dict[str, nn.Module], windows: Tensor) -> None:
    """The tokenizer's ids fit every model's embedding (another model's tokenizer would index
    past it)."""
    top = int(windows.max()) if windows.numel() else -1
    for name, model in models.items():
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embed, "num_embeddings", None)
        if isinstance(rows, int) and top >= rows:
            raise LowbitError(f"the tokenizer gives id {top}, past {name}'s {rows}-token "
                              f"vocabulary: the tokenizer belongs to another model")  # fmt: skip
