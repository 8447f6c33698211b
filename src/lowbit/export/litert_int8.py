"""Full-integer LiteRT export of a W8A8 image model: int8 activations between the layers.

A model whose every quantized layer takes static 8-bit per-tensor inputs and int8 symmetric
per-output-channel weights (``conv-w8a8-static`` / ``-gptq`` / ``-best``) becomes a ``.tflite``
whose convolutions run on int8 tensors (CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED with int8
inputs, int8 weights and int32 biases), the edge runtime's full-integer form. The numbers are
lowbit's, not a converter's:

- each layer's input scale and zero point are its calibrated static range (a uint8 zero point z
  is the int8 zero point z - 128: the same codes, shifted);
- its weight codes and per-channel scales are the folder's (a code of -128, which GPTQ can
  reach, becomes -127: the file's int8 weights are symmetric; the count is logged), its bias
  the int32 ``round(b / (s_in * s_w[c]))`` that the runtime adds to the integer sums;
- a layer's *output* is rounded to int8 too (LiteRT has no convolution with a fused LeakyReLU
  and a float output in this form): its range comes from that output's values over the model's
  calibration inputs (min-max), measured on the quantized model, cut where the activation that
  reads it is flat (ReLU below 0, a clamp outside [0, 1], tanh beyond +-4). This is one
  rounding more per layer than lowbit's own arithmetic, so the file's outputs are close to the
  folder's, not equal (the export logs the PSNR between them on the example input).

Residual adds, sigmoid gates, products and pooling (waifu2x upresnet10's squeeze-excitation)
run on int8 too. The tensors no layer's range covers (a gated product, a residual sum that
only the skip connection reads) get the min-max that ai-edge-quantizer's calibrator measures
on the same calibration inputs, in the float graph (the codes' values) converted at the
calibration inputs' shape (the converter names tensors after the model's operations, so the
names carry over to the example's shape). An activation's output range is what it maps its
input's range to (a LeakyReLU shrinks the negative side). A layer input that other operators
read too (a residual stream feeding a convolution and the skip) keeps a range wide enough
for both, and the layer reads a copy requantized (QUANTIZE, int8 to int8) onto its own
static range: lowbit rounds only the layer's input, never the skip.

How: litert-torch converts the model with float weights that equal the codes' values;
ai-edge-quantizer's static int8 recipe is handed these ranges as its calibration result;
the codes, scales and biases are then written into the flatbuffer, and ReLU / LeakyReLU and
the output's clamp between two int8 tensors run on int8 (the quantizer leaves them in float
between a DEQUANTIZE and a QUANTIZE). The file takes and returns float32: a QUANTIZE op first,
a DEQUANTIZE last, int8 in between (where the quantizer leaves an output squashing in float
after the last layer, that tail is allowed). Any other operator the quantizer leaves in float
(a sine, say) is refused: export such a model weight-only.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.assets import hidden_stem
from lowbit.errors import LowbitError
from lowbit.export.litert_codes import digest, exact_reason
from lowbit.export.litert_flat import add_metadata
from lowbit.export.litert_image import INFO_KEY, float_layer
from lowbit.export.litert_int8_graph import Int8Graph, qsv_range
from lowbit.models import set_module
from lowbit.nn import QuantLinear
from lowbit.nn.quant_conv import QuantConv
from lowbit.packing import pack

log = logging.getLogger(__name__)


def full_int_reason(mod: QuantLinear) -> str | None:
    """Why ``mod`` has no full-integer LiteRT form, or None."""
    act = mod.act
    if act is None or not act.static or act.bits != 8 or act.granularity != "tensor":
        return "inputs not rounded to static 8-bit per-tensor ranges"
    if act.step_groups != 1:
        return "several ranges per layer (step_groups)"
    spec = mod.spec
    if spec.qtype.bits != 8 or not spec.symmetric or spec.granularity != "channel":
        return "weights other than int8 symmetric per output channel"
    if isinstance(mod, QuantConv) and mod.geometry.groups != 1:
        return "a grouped convolution"
    return exact_reason(mod)


def write_litert_int8(model: nn.Module, example: Tensor, calibration: Tensor, name: str,
                      out: Path) -> dict[str, str]:  # fmt: skip
    """Convert the W8A8 image ``model`` (loaded without kernels) at the shape of ``example``
    (one input, batch 1) into the full-integer file ``out``; ``calibration``: the inputs the
    layers' output ranges are measured on. Returns layer -> encoding."""
    try:
        import litert_torch
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools import flatbuffer_utils
        from ai_edge_quantizer import qtyping, quantizer, recipe
    except ImportError:
        raise LowbitError("LiteRT export needs litert-torch, ai-edge-litert and "
                          "ai-edge-quantizer: pip install 'lowbit[litert]'") from None  # fmt: skip
    with torch.no_grad():
        reference = model(example.float())  # the folder's output (before any code is moved)
    layers = _check_layers(model)
    inputs = {n: _input_range(m) for n, m in layers.items()}
    outputs = _output_ranges(model, layers, calibration)
    weights = {}  # digest of the float weight in the file's layout -> (layer, codes, scales)
    for lname, mod in layers.items():
        layer, forms = float_layer(lname, mod)
        set_module(model, lname, layer)
        for values, enc in forms:
            key = digest(values)
            if key in weights and weights[key][0] != lname:
                raise LowbitError(f"{lname} and {weights[key][0]} hold identical weights; the "
                                  f"export tells layers apart by their weights")  # fmt: skip
            weights[key] = (lname, enc, layer)
    from lowbit.export.litert_file import quiet_litert_torch

    quiet_litert_torch()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{hidden_stem(out)}.") as work:
        raw = Path(work) / "float.tflite"
        litert_torch.convert(model.eval(), (example.float(),)).export(str(raw))
        graph = Int8Graph(flatbuffer_utils.read_model(str(raw)), fb)
        found = graph.layers(weights)
        qsv = graph.ranges(found, inputs, outputs)
        qz = quantizer.Quantizer(str(raw), recipe.static_wi8_ai8())
        missing = graph.unranged(qsv)
        if missing:  # residual adds, gates, pooling: measured by the quantizer
            qsv = {**_calibrated(model, calibration, missing, Path(work)), **qsv}
        qsv = graph.widen(qsv, found, inputs)
        for op in ("INPUT", "OUTPUT"):  # float32 in and out
            qz.update_quantization_recipe(".*", qtyping.TFLOperationName[op],
                                          algorithm_key="no_quantize")  # fmt: skip
        try:
            result = qz.quantize(qsv, enable_progress_report=False)
        except Exception as exc:  # the quantizer's own errors name tensors, not layers
            raise LowbitError(f"ai-edge-quantizer could not quantize {name} with lowbit's "
                              f"ranges: {str(exc).splitlines()[0]}") from None  # fmt: skip
        flat = Int8Graph(flatbuffer_utils.read_model_from_bytearray(result.quantized_model), fb)
        moved = flat.requantize(found, inputs)
        if moved:
            log.info("%d layer inputs requantized onto the layer's range (their tensors feed "
                     "other operators too)", moved)  # fmt: skip
        written = flat.write_layers(found, inputs)
        flat.integer_activations()
        flat.check_integer()
        info = {"producer": "lowbit", "model": name, "input": list(example.shape),
                "layers": written, "integer": True}  # fmt: skip
        add_metadata(flat.model, INFO_KEY, json.dumps(info).encode())
        flatbuffer_utils.write_model(flat.model, str(out))
    _log_agreement(out, example, reference)
    return written


def _check_layers(model: nn.Module) -> dict[str, QuantLinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LowbitError("the model has no quantized layers to export")
    for lname, mod in layers.items():
        _narrow(lname, mod)
        reason = full_int_reason(mod)
        if reason is not None:
            raise LowbitError(f"{lname}: {reason} has no full-integer LiteRT form; quantize "
                              f"with conv-w8a8-static (or -gptq, -best), or with a weight-only "
                              f"recipe (w8-rtn) for a weight-only file")  # fmt: skip
    return layers


def _narrow(lname: str, mod: QuantLinear) -> None:
    """Move int8 codes of -128 to -127: LiteRT's int8 weights are symmetric in [-127, 127], and
    GPTQ's error feedback can push a weight past -127 steps (RTN never does). Each moved weight
    changes by one step; the count is logged."""
    if mod.spec.qtype.kind != "int" or mod.spec.qtype.bits != 8 or not mod.spec.symmetric:
        return
    codes = mod.codes()  # uint8, -128 is code 0
    moved = int((codes == 0).sum())
    if moved:
        mod.qweight.copy_(pack(codes.clamp_min(1), 8))
        log.warning("%s: %d of %d int8 codes moved from -128 to -127 (LiteRT's int8 weights "
                    "are symmetric in [-127, 127])", lname, moved, codes.numel())  # fmt: skip


def _input_range(mod: QuantLinear) -> tuple[float, int]:
    """(scale, int8 zero point) of the layer's static input range."""
    scale = float(mod.act_scale[0])
    zero = 0 if mod.act_zero is None else int(mod.act_zero[0]) - 128  # uint8 codes, shifted
    return scale, zero


@torch.no_grad()
def _output_ranges(model: nn.Module, layers: dict[str, QuantLinear], calibration: Tensor,
                   batch: int = 8) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Min and max of each layer's output over ``calibration`` (the quantized model's), widened
    to hold zero. (Choosing the low end before a LeakyReLU by the squared error after it was
    tried on waifu2x: PSNR fell by 0.3-1.0 dB on the evaluation image; clipping generalises
    badly here, as the percentile observer does.)"""
    seen: dict[str, tuple[float, float]] = {}

    def hook(lname: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            lo, hi = min(float(out.min()), 0.0), max(float(out.max()), 0.0)
            old = seen.get(lname, (lo, hi))
            seen[lname] = (min(lo, old[0]), max(hi, old[1]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for part in calibration.float().split(batch):
            model(part)
    finally:
        for h in handles:
            h.remove()
    return seen


def _calibrated(model: nn.Module, calibration: Tensor, names: list[str],
                work: Path) -> dict[str, dict]:  # fmt: skip
    """Min-max ranges of the tensors ``names`` (residual sums, gated products, pooled values:
    what no layer's own range covers), measured by ai-edge-quantizer's calibrator on the float
    graph (the codes' values) converted at the calibration inputs' shape, one input at a time.
    The converter names tensors after the model's operations, not their shapes, so the names
    are those of the file written at the example's shape (checked)."""
    import litert_torch
    from ai_edge_quantizer import calibrator, recipe, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    first = calibration[:1].float()
    path = work / "calibration.tflite"
    litert_torch.convert(model.eval(), (first,)).export(str(path))
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = calibrator.Calibrator(path.read_bytes(), num_threads=torch.get_num_threads(),
                                  qsv_update_func=qsv_utils.min_max_update)  # fmt: skip
    from ai_edge_litert.interpreter import Interpreter

    (key,) = Interpreter(model_path=str(path)).get_signature_list()["serving_default"]["inputs"]
    data = [{key: x[None].numpy()} for x in calibration.float()]
    calib.calibrate({"serving_default": data}, manager)
    found = calib.get_model_qsvs()
    absent = [n for n in names if n not in found]
    if absent:
        raise LowbitError(f"{absent[0]}: no range for this tensor in the graph converted at the "
                          f"calibration inputs' shape; the full-integer export needs the same "
                          f"graph at both shapes")  # fmt: skip
    return {
        n: qsv_range(float(np.min(found[n]["min"])), float(np.max(found[n]["max"]))) for n in names
    }


def _log_agreement(path: Path, example: Tensor, reference: Tensor) -> None:
    from lowbit.models.litert_image import LiteRTImageModel, image_info

    out = LiteRTImageModel(path, image_info(path))(example.float())
    mse = float((out - reference).double().pow(2).mean())
    peak = float(reference.abs().max())
    db = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    log.info("the full-integer file's output on the example input is %.2f dB PSNR from the "
             "folder's (one more int8 rounding per layer output)", db)  # fmt: skip


__all__ = ["full_int_reason", "write_litert_int8"]
