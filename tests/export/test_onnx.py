"""ONNX export, checked by ONNX Runtime: MatMulNBits for weight-only layers, MatMulInteger with
per-token activations for W8A8."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_recipe, quantized_folder
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.nn import QuantLinear

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(folder, x):
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": x.numpy()})[0]


def _op_types(folder):
    import onnx

    return {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}


def test_onnxruntime_matches_lowbit(tiny_folder, tmp_path):
    """Every weight form in one graph (an export takes seconds): 4-bit groups of 32 with an
    offset, groups of 64 with integer zero points, 4-bit and 8-bit per channel."""
    from lowbit.recipes import Recipe

    recipe = Recipe.from_dict({
        "version": 1, "name": "mixed", "ignore": ["lm_head"],
        "weights": {"bits": 4, "group_size": 32},
        "overrides": [
            {"match": "re:.*\\.o_proj$", "weights": {"bits": 4, "group_size": 64,
                                                      "zero_point": "int"}},
            {"match": "re:.*\\.gate_proj$", "weights": {"bits": 4, "group_size": -1}},
            {"match": "re:.*\\.down_proj$", "weights": {"bits": 8, "group_size": -1,
                                                        "symmetric": True}},
        ],
    })  # fmt: skip
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", recipe)
    forms = {(m.spec.bits, m.spec.group_size, m.spec.zero_point) for m in model.modules()
             if isinstance(m, QuantLinear)}  # fmt: skip
    assert len(forms) == 4, forms
    out = export(folder, "onnx", tmp_path / "onnx").path
    assert "MatMulNBits" in _op_types(out)
    x = torch.randint(0, 50, (2, 16))  # batch and length differ from the export's example
    with torch.no_grad():
        ours = model(x).logits.numpy()
    np.testing.assert_allclose(_run(out, x), ours, atol=1e-4, rtol=0)


def test_a_model_without_a_position_limit_exports(tmp_path):
    """BLOOM's config has no max_position_embeddings (ALiBi): the sequence is left unbounded."""
    from helpers import make_tokenizer, tiny_family_model

    src = tmp_path / "bloom"
    tiny_family_model("bloom").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    folder, model = quantized_folder(
        src, tmp_path / "q", make_recipe({"bits": 4, "group_size": 32})
    )
    out = export(folder, "onnx", tmp_path / "onnx").path
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours = model(x).logits.numpy()
    np.testing.assert_allclose(_run(out, x), ours, atol=1e-4, rtol=0)


def test_w8a8_runs_int8_matmul_with_per_token_activations(tiny_folder, tmp_path, monkeypatch):
    acts = {"bits": 8, "granularity": "token", "dynamic": True}
    rec = make_recipe({"bits": 8, "group_size": -1, "symmetric": True}, acts)
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", rec)
    out = export(folder, "onnx", tmp_path / "onnx").path
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & _op_types(out) == {"MatMulInteger"}

    def per_token_8bit(self, x):  # the recipe's arithmetic: 8-bit codes, amax/127 per token
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return F.linear(torch.round(x / s).clamp(-127, 127) * s, self.dequantized_weight())

    monkeypatch.setattr(QuantLinear, "forward", per_token_8bit)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours = model(x).logits.numpy()
    np.testing.assert_allclose(_run(out, x), ours, atol=1e-4, rtol=0)


def test_unsupported_layer_is_a_clear_error(tiny_folder, tmp_path):
    folder, _ = quantized_folder(tiny_folder, tmp_path / "q", "w3-rtn-g32")
    with pytest.raises(LowbitError, match=r"layers\.0\.self_attn\.q_proj: int3.*MatMulNBits"):
        export(folder, "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_an_online_rotation_is_exported_as_graph_ops(tiny_folder, tmp_path):
    """down_proj's run-time Hadamard transform (rotate.online) becomes plain ONNX ops before
    its MatMulNBits: ONNX Runtime computes lowbit's logits (without the transform they differ
    by far more than the tolerance: W·H is folded into the weight)."""
    import dataclasses

    from lowbit.algorithms.rotate import RotateOptions

    recipe = dataclasses.replace(make_recipe({"bits": 4, "group_size": 32}),
                                 rotate=RotateOptions(online=("down_proj",)))  # fmt: skip
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", recipe)
    out = export(folder, "onnx", tmp_path / "onnx").path
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours = model(x).logits.numpy()
    np.testing.assert_allclose(_run(out, x), ours, atol=1e-4, rtol=0)
