"""LoRC: low-rank correction of the quantization error, through the recipe, save/load, inspect."""

import pytest
import torch

from helpers import make_recipe, quantized_folder
from lowbit import api
from lowbit.algorithms import lorc_factors, rtn, with_lorc
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.eval.inspection import inspect_folder
from lowbit.formats import WeightSpec
from lowbit.nn import QuantLinear
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe


def test_full_rank_reconstructs_the_float_weight():
    w = torch.randn(48, 96)
    qw = rtn(w, WeightSpec(bits=3, group_size=32))
    u, v = lorc_factors(w, qw.dequantize(), rank=48)
    assert u.dtype == v.dtype == torch.float16 and u.shape == (48, 48) and v.shape == (48, 96)
    back = qw.dequantize() + u.float() @ v.float()
    assert sqnr_db(w, back) > 60  # exact up to the fp16 storage of the factors
    assert sqnr_db(w, qw.dequantize()) < 20


def test_rank_r_is_the_best_rank_r_fit_and_error_falls_with_rank():
    w = torch.randn(64, 128)
    base = rtn(w, WeightSpec(bits=3, group_size=64)).dequantize()
    err = w - base
    s = torch.linalg.svdvals(err)
    residuals = []
    for r in (1, 4, 16):
        u, v = lorc_factors(w, base, r)
        residual = (err - u.float() @ v.float()).norm().item()
        assert residual == pytest.approx(s[r:].norm().item(), rel=1e-3)  # Eckart-Young optimum
        residuals.append(residual)
    assert residuals == sorted(residuals, reverse=True)


def test_zero_rank_leaves_the_weight_alone():
    w = torch.randn(8, 32)
    qw = with_lorc(rtn(w, WeightSpec(bits=4, group_size=32)), w)
    assert qw.lorc is None


def test_recipe_key_layers_saved_loaded_and_counted(tiny_folder, tmp_path):
    no_lorc = [{"match": "re:.*v_proj", "weights": {"lorc_rank": 0}}]
    body = {"version": 1, "weights": {"bits": 3, "group_size": 32}, "lorc": {"rank": 4}}
    rec = Recipe.from_dict({**body, "ignore": ["lm_head"], "overrides": no_lorc})
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", rec)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.lorc_u.shape == (64, 4)
    assert model.model.layers[0].self_attn.v_proj.lorc_u is None  # override drops it
    loaded = api.load(folder).model  # kernels requested: LoRC layers keep the reference path
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    info = inspect_folder(folder)["layers"]["model.layers.0.mlp.down_proj"]
    plain = 3 + 2 * 16 / 32  # int3 codes + fp16 scale and offset per 32
    extra = 16 * 4 * (64 + 128) / (64 * 128)  # fp16 U (64x4) and V (4x128)
    assert info["bits_per_weight"] == pytest.approx(plain + extra)
    assert "+lorc4" in info["format"]


def test_lorc_lowers_output_error_under_gptq(tiny_folder):
    g = torch.Generator().manual_seed(0)
    cal = CalibrationSet("random", 8, 32, 0, torch.randint(0, 50, (8, 32), generator=g))
    x = torch.randint(0, 50, (2, 16))
    errs = {}
    for rank in (0, 8):
        src = api.load_model(str(tiny_folder))
        with torch.no_grad():
            ref = src.model(x).logits
        rec = make_recipe({"bits": 3, "group_size": 32, "lorc_rank": rank})
        rec = Recipe.from_dict({**rec.to_dict(), "algorithm": "gptq"})
        api.quantize(src.model, rec, cal, progress=False)
        with torch.no_grad():
            errs[rank] = (src.model(x).logits - ref).norm().item()
    assert errs[8] < errs[0]


@pytest.mark.parametrize("bad", [{"rank": "8"}, {"rank": 8, "alpha": 1}, 8])
def test_bad_lorc_key_is_a_clear_error(bad):
    with pytest.raises(LowbitError, match="lorc"):
        Recipe.from_dict({"version": 1, "lorc": bad})
