"""The Python API's arguments: a plausible mistake is one LowbitError naming it, raised before
the model is touched (so the same call, corrected, works on the same model object)."""

import pytest
import torch

from helpers import make_recipe, make_tokenizer, tiny_llama
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear


def windows(n=8, seqlen=16, vocab=64):
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet("test", n, seqlen, 0, ids)


def quantized_layers(model):
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_weight_with_nan_is_found_before_any_layer_is_replaced():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="layers.1.mlp.down_proj: the weight holds NaN"):
        api.quantize(model, "w4-rtn-g64", progress=False)
    assert quantized_layers(model) == 0
    fixed = make_recipe({"bits": 4, "group_size": 64}, ignore=("lm_head", "re:.*1.mlp.down_proj"))
    api.quantize(model, fixed, progress=False)  # the message's advice, on the same model
    assert quantized_layers(model) == 13


def test_static_ranges_outside_the_blocks_are_refused_before_any_work():
    model = tiny_llama(tie=False)
    recipe = make_recipe({"bits": 8, "group_size": -1},
                         {"granularity": "tensor", "dynamic": False}, ignore=())  # fmt: skip
    with pytest.raises(LowbitError, match=r"outside the decoder blocks \(lm_head\)"):
        api.quantize(model, recipe, windows(), progress=False)
    assert quantized_layers(model) == 0


def test_a_rotation_waits_for_the_other_checks():
    model = tiny_llama()
    before = state(model)
    recipe = api.load_recipe("w4-gptq-g64").to_dict() | {"rotate": {"kind": "hadamard"}}
    with pytest.raises(LowbitError, match="needs calibration data"):
        api.quantize(model, recipe, None, progress=False)  # (a mapping is a recipe too)
    rtn = make_recipe({"bits": 4, "group_size": 64}).to_dict() | {"rotate": {"kind": "hadamard"}}
    with pytest.raises(LowbitError, match="qat needs 20 training windows"):
        api.qat(model, rtn, windows(8), api.QATOptions(steps=10), progress=False)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_a_quantized_model_a_half_precision_one_and_wrong_types_are_named():
    model = tiny_llama()
    api.quantize(model, "w4-rtn-g64", progress=False)
    with pytest.raises(LowbitError, match="already quantized"):
        api.quantize(model, "w4-rtn-g64", progress=False)
    with pytest.raises(LowbitError, match="calibration runs the model in float32"):
        api.quantize(tiny_llama().half(), "w4-gptq-g64", windows(), progress=False)
    for call, said in (
        (lambda: api.quantize("some/path", "w4-rtn-g64"), "expected a torch model"),
        (lambda: api.quantize(tiny_llama(), "w4-gptq-g64", make_tokenizer()), "CalibrationSet"),
        (lambda: api.quantize(tiny_llama(), 4), "recipe: expected a preset name"),
        (lambda: api.analyze(tiny_llama(), "w4-rtn-g64", None), "CalibrationSet"),
        (lambda: api.qat(tiny_llama(), "w4-rtn-g64", windows(), {"steps": 2}), "QATOptions"),
    ):
        with pytest.raises(LowbitError, match=said):
            call()


def test_save_takes_only_the_report_of_the_model_itself(tmp_path):
    model = tiny_llama()
    report = api.quantize(model, "w4-rtn-g64", progress=False)
    with pytest.raises(LowbitError, match="is not a quantized layer of this model"):
        api.save(tiny_llama(), tmp_path / "float", report)
    other = tiny_llama()
    eight = api.quantize(other, "w8-rtn", progress=False)
    with pytest.raises(LowbitError, match=r"is int4-\S+ in the model and int8-\S+ in the report"):
        api.save(model, tmp_path / "mixed", eight)
    assert not (tmp_path / "float").exists() and not (tmp_path / "mixed").exists()
    api.save(model, tmp_path / "ok", report)


def test_a_tokenizer_of_another_vocabulary_is_named(tmp_path, text_file):
    with pytest.raises(LowbitError, match="past model's 16-token vocabulary"):
        api.evaluate(tiny_llama(vocab=16), make_tokenizer(), str(text_file), seqlen=16,
                     tokens=64, progress=False)  # fmt: skip
