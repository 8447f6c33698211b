"""Activation quantization through the pipeline: static ranges, SmoothQuant and LKD steps."""

import pytest
import torch

from helpers import tiny_family_model
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
from lowbit.recipes import Recipe

W8 = {"bits": 8, "symmetric": True, "group_size": -1}
W4 = {"bits": 4, "group_size": 32}
STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "observer": "percentile"}


def calib(n=8, seqlen=32, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(
        "random", n, seqlen, seed, torch.randint(0, vocab, (n, seqlen), generator=g)
    )


def recipe(weights, activations, algorithm="rtn", **extra):
    body = {"version": 1, "algorithm": algorithm, "weights": weights, "activations": activations}
    return Recipe.from_dict({**body, "ignore": ["lm_head"], **extra})


def test_static_ranges_are_calibrated_saved_and_reloaded(tmp_path, tiny_folder):
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, recipe(W8, STATIC), calib(), progress=False)
    layers = [m for m in src.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(torch.isfinite(m.act_scale).all() and m.act_scale > 0 for m in layers)
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded = api.load(out, kernels=False).model
    fast = api.load(out, kernels=True).model  # oneDNN's int8 linear on AVX-512 VNNI CPUs
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        want = src.model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
        # exact integer sums; the reference's float32 sums can flip a code in a later layer
        d = (fast(ids).logits - want).abs().max()
        assert d <= 0.01 * want.abs().max()
    assert api.load(out).manifest["layers"]["model.layers.0.mlp.down_proj"]["activations"][
        "observer"]["name"] == "percentile"  # fmt: skip


def test_static_ranges_need_calibration_data():
    with pytest.raises(LowbitError, match="static activation ranges"):
        quantize_weights(tiny_family_model("llama"), recipe(W8, STATIC), None, progress=False)


def test_smoothquant_runs_in_the_block_runner_and_reports_alpha():
    model = tiny_family_model("llama")
    sq = recipe(W8, {"bits": 8}, smoothquant={"alpha": 0.5})
    report = quantize_weights(model, sq, calib(vocab=64), progress=False)
    assert report.smooth_alpha and set(report.smooth_alpha.values()) == {0.5}
    assert len(report.blocks) == 2
    # diagnostics compare with the smoothed float weight, not the unscaled one
    assert all(layer.weight_sqnr_db > 35 for layer in report.layers.values())
    assert all(layer.output_sqnr_db > 25 for layer in report.layers.values())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 16))).logits).all()


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_lkd_never_raises_a_blocks_error_and_repacks_the_trained_grid(algorithm):
    model, plain = tiny_family_model("llama"), tiny_family_model("llama")
    lkd = recipe(W4, {"bits": 8}, algorithm, lkd={"steps": 20, "lr": 1e-4, "batch_size": 2})
    report = quantize_weights(model, lkd, calib(vocab=64), progress=False)
    quantize_weights(plain, recipe(W4, {"bits": 8}, algorithm), calib(vocab=64), progress=False)
    assert len(report.lkd) == 2
    assert all(v["loss_after"] <= v["loss_before"] for v in report.lkd.values())
    trained = [n for n, v in report.lkd.items() if v["loss_after"] < v["loss_before"]]
    assert trained  # (a block whose error did not fall keeps its start, so <= holds anyway)
    name = f"{trained[0]}.self_attn.q_proj"
    layer, start = model.get_submodule(name), plain.get_submodule(name)
    assert isinstance(layer, QuantLinear) and layer.act is not None
    assert not torch.equal(layer.dequantized_weight(), start.dequantized_weight())  # repacked


def test_lkd_keeps_the_layers_it_cannot_train_as_they_are():
    """A mixed plan's fp16 or integer-zero layers: kept, the others trained (it failed)."""
    model = tiny_family_model("llama")
    odd = [{"match": "re:.*v_proj", "weights": {"format": "fp16"}},
           {"match": "re:.*o_proj", "weights": {"bits": 4, "zero_point": "int"}}]  # fmt: skip
    lkd = recipe(W4, {"bits": 8}, lkd={"steps": 4, "lr": 1e-4, "batch_size": 2}, overrides=odd)
    report = quantize_weights(model, lkd, calib(vocab=64), progress=False)
    assert len(report.lkd) == 2
    assert report.layers["model.layers.0.self_attn.v_proj"].spec.format == "fp16"


def test_w4a8_layers_round_their_inputs():
    model = tiny_family_model("llama")
    quantize_weights(model, recipe(W4, {"bits": 8}), None, progress=False)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, layer.in_features)
    assert not torch.equal(layer.quantize_input(x), x)
