import pytest
import torch

from helpers import FAMILIES, tiny_family_model
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
from lowbit.recipes import Recipe


def calib(n=8, seqlen=32, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(
        "random", n, seqlen, seed, torch.randint(0, vocab, (n, seqlen), generator=g)
    )


def recipe(algorithm, **weights):
    data = {"version": 1, "algorithm": algorithm, "ignore": ["lm_head"],
            "weights": {"bits": 4, "group_size": 32, **weights},
            "awq": {"search_samples": 4, "grid": 5}}  # fmt: skip
    return Recipe.from_dict(data)


CASES = [(f, a) for f in FAMILIES for a in ("gptq", "awq")] + [
    ("llama", "awq+gptq"),
    ("opt", "hqq"),
    ("olmo2", "awq"),  # post-norm blocks: no norm feeds q/k/v or gate/up
]


@pytest.mark.parametrize(("family", "algorithm"), CASES)
def test_every_algorithm_runs_on_every_family(family, algorithm):
    model = tiny_family_model(family)
    ids = torch.randint(0, 64, (1, 16))
    report = quantize_weights(model, recipe(algorithm), calib(), progress=False)
    assert report.layers and all(
        isinstance(model.get_submodule(n), QuantLinear) for n in report.layers
    )
    assert len(report.blocks) == 2  # measured whenever there is calibration data
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_awq_scales_are_saved_and_reloaded_exactly(tmp_path, tiny_folder):
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, recipe("awq"), calib(vocab=50))
    assert report.awq_alpha  # scales were searched and folded
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded = api.load(out, kernels=False).model
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, src.model(ids).logits)
    manifest = api.load(out).manifest
    assert manifest["calibration"]["token_sha256"] and len(manifest["blocks"]) == 2


def test_calibrated_algorithms_need_calibration():
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_weights(tiny_family_model("llama"), recipe("gptq"), None, progress=False)


@pytest.mark.parametrize("family", ["mystery", "qwen3", "gemma2", "gemma3", "phi3"])
def test_awq_and_smoothquant_trace_the_wiring_of_a_family_nobody_mapped(family):
    """AWQ and SmoothQuant on families without a hand-written mapping: the wiring is traced
    (the attention and MLP input norms scale their linears) and the model is quantized."""
    model = tiny_family_model("llama" if family == "mystery" else family)
    model.config.model_type = f"unmapped-{family}"  # no hand-written mapping applies
    report = quantize_weights(model, recipe("awq"), calib(), progress=False)
    norms = {k.rsplit(".", 1)[-1] for k in report.awq_alpha}
    assert {"input_layernorm"} < norms and len(report.awq_alpha) >= 4
    smooth = Recipe.from_dict({**recipe("rtn").to_dict(), "weights": {"bits": 8, "group_size": -1},
                               "activations": {"bits": 8, "granularity": "token", "dynamic": True},
                               "smoothquant": {}})  # fmt: skip
    model = tiny_family_model("llama" if family == "mystery" else family)
    model.config.model_type = f"unmapped-{family}"
    report = quantize_weights(model, smooth, calib(), progress=False)
    assert len(report.smooth_alpha) >= 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 16))).logits).all()


def test_gptq_lowers_block_output_error_versus_rtn_on_the_same_inputs():
    """Per block, the runner's measured output error with GPTQ is below RTN's."""
    base = tiny_family_model("llama", seed=3)
    errors = {}
    for algorithm in ("gptq", "rtn-in-runner"):
        model = tiny_family_model("llama", seed=3)
        model.load_state_dict(base.state_dict())
        if algorithm == "gptq":
            rep = quantize_weights(
                model, recipe("gptq", bits=3), calib(n=16, seqlen=64), progress=False
            )
        else:
            rep = quantize_weights(model, Recipe.from_dict({"version": 1, "algorithm": "awq",
                                   "weights": {"bits": 3, "group_size": 32}, "ignore": ["lm_head"],
                                   "awq": {"grid": 1, "clip": False}}), calib(n=16, seqlen=64),
                                   progress=False)  # fmt: skip
        errors[algorithm] = rep.blocks[0].output_error
    assert errors["gptq"] < errors["rtn-in-runner"]
