"""End-to-end tuning (recipe block ``tune``) through the pipeline: the codes stay, the scales
move the model towards float, streamed = in memory, saved and loaded exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.recipes import Recipe

TUNE = {"steps": 24, "batch_size": 2, "lr": 0.002, "holdout": 2}


def recipe(tune: dict | None = TUNE, algorithm: str = "rtn", **extra) -> Recipe:
    body = {"version": 1, "name": "t", "algorithm": algorithm, "ignore": ["lm_head"],
            "weights": {"bits": 3, "group_size": 32}, **extra}  # fmt: skip
    if tune is not None:
        body["tune"] = tune
    return Recipe.from_dict(body)


def calib(vocab: int = 64, n: int = 12) -> CalibrationSet:
    windows = torch.randint(0, vocab, (n, 32), generator=torch.Generator().manual_seed(0))
    return CalibrationSet("test", n, 32, 0, windows)


def kl(model, ref, ids) -> float:
    with torch.no_grad():
        p = F.log_softmax(ref(ids).logits, -1)
        q = F.log_softmax(model(ids).logits, -1)
    return float(F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())


def layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_tuning_keeps_the_codes_and_brings_held_out_text_closer_to_float():
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(7))
    ref = tiny_llama()
    plain, tuned = tiny_llama(), tiny_llama()
    api.quantize(plain, recipe(None), calib(), progress=False)
    report = api.quantize(tuned, recipe(), calib(), progress=False)
    record = report.tune
    assert record["held_out_kl_after"] < record["held_out_kl_before"]
    assert kl(tuned, ref, ids) < 0.9 * kl(plain, ref, ids)  # text it never saw
    a, b = layers(plain), layers(tuned)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:  # the codes are the rounding's; only the grids moved
        assert torch.equal(a[name].qweight, b[name].qweight)
        assert a[name].scale.dtype == b[name].scale.dtype == torch.float16
    assert any(not torch.equal(a[n].scale, b[n].scale) for n in a)


def test_gpt2_layers_are_tuned_in_memory():
    """GPT-2's Conv1D layers become linears before the tuning check plans them (it once saw
    none and refused the recipe; the folder path converted them first)."""
    from helpers import tiny_family_model

    model = tiny_family_model("gpt2")
    report = api.quantize(model, recipe({**TUNE, "steps": 4}), calib(), progress=False)
    assert report.tune is not None and len(layers(model)) == 8  # 4 per block


def test_a_run_that_cannot_improve_puts_the_scales_back():
    model = tiny_llama()
    api.quantize(model, recipe(None), calib(), progress=False)
    before = {n: m.scale.clone() for n, m in layers(model).items()}
    from lowbit.algorithms.tune import TuneOptions
    from lowbit.pipeline.tune import tune_model

    record = tune_model(model, model, TuneOptions(**TUNE), calib(), progress=False)  # KL 0
    assert record["held_out_kl_before"] == record["held_out_kl_after"]
    assert all(torch.equal(m.scale, before[n]) for n, m in layers(model).items())


@pytest.mark.parametrize("cache", [None, {"kv_bits": 4}], ids=["float-cache", "kv4"])
def test_streamed_equals_in_memory(tiny_folder, tmp_path, cache):
    data = calib(vocab=50)
    extra = {} if cache is None else {"attention": cache}  # tuned with the cache it runs with
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, recipe(**extra), data, progress=False)
    mem = api.save(src.model, tmp_path / "mem", report, source=src)
    out, _ = api.quantize_to(str(tiny_folder), recipe(**extra), tmp_path / "stream", data,
                             progress=False)  # fmt: skip
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        a = api.load(mem, kernels=False).model(x).logits
        b = api.load(out, kernels=False).model(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert report.tune["held_out_kl_after"] <= report.tune["held_out_kl_before"]


def test_the_folder_records_the_tuned_model(tiny_folder, tmp_path):
    data = calib(vocab=50)
    out, report = api.quantize_to(str(tiny_folder), recipe(), tmp_path / "stream", data,
                                  progress=False)  # fmt: skip
    manifest = json.loads((out / "lowbit.json").read_text())
    tune = manifest["tune"]
    assert tune["held_out_kl_after"] < tune["held_out_kl_before"] and tune["layers"] == 14
    assert report.seconds > tune["seconds"] > 0  # the run's time includes the tuning
    assert manifest["quantize_seconds"] == round(report.seconds, 3)
    assert manifest["recipe"]["tune"]["steps"] == TUNE["steps"]
    untuned, _ = api.quantize_to(str(tiny_folder), recipe(None), tmp_path / "plain", data,
                                 progress=False)  # fmt: skip
    plain = json.loads((untuned / "lowbit.json").read_text())
    assert manifest["canary"]["kl"] < plain["canary"]["kl"]  # measured on the tuned model
    from lowbit.models.verify import file_hashes

    assert file_hashes(out, ["model.safetensors"]) == manifest["files"]


def test_recipes_keep_the_block_and_refuse_what_it_cannot_tune():
    again = Recipe.from_dict(recipe().to_dict())
    assert again.tune.steps == 24 and again.needs_calibration
    assert recipe(None).to_dict().get("tune") is None
    assert Recipe.from_dict({**recipe(None).to_dict(), "tune": {}}).tune.steps == 64
    with pytest.raises(LowbitError, match="lr"):
        recipe({"lr": 2.0})
    with pytest.raises(LowbitError, match="tune.stepz|unknown"):
        recipe({"stepz": 3})
    static = {"bits": 8, "granularity": "tensor", "dynamic": False}
    with pytest.raises(LowbitError, match="static"):
        recipe(activations=static)
    with pytest.raises(LowbitError, match="calibration"):
        api.quantize(tiny_llama(), recipe(), None, progress=False)
    with pytest.raises(LowbitError, match="at least 4 calibration windows"):
        api.quantize(tiny_llama(), recipe(), calib(n=3), progress=False)
    with pytest.raises(LowbitError, match="no planned layer it can tune"):
        api.quantize(tiny_llama(), recipe(lorc={"rank": 2}), calib(), progress=False)
    nf4 = Recipe.from_dict({**recipe().to_dict(), "weights": {"format": "nf4", "group_size": 32}})
    with pytest.raises(LowbitError, match="no planned layer it can tune"):
        api.quantize(tiny_llama(), nf4, calib(), progress=False)


def test_a_streamed_run_checks_before_any_work(tiny_folder, tmp_path):
    with pytest.raises(LowbitError, match="at least 4 calibration windows"):
        api.quantize_to(str(tiny_folder), recipe(), tmp_path / "q", calib(vocab=50, n=3),
                        progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == [tiny_folder]  # no work folder, no output


def test_the_estimate_bounds_the_tuning_memory(tiny_folder):
    data = calib(vocab=50)
    plain = api.estimate(str(tiny_folder), recipe(None), data, progress=False, canary=False)
    tuned = api.estimate(str(tiny_folder), recipe(), data, progress=False, canary=False)
    assert tuned["tuning"] and not plain["tuning"]
    bound = tuned["probe"]["baseline_mb"] + 4 * tuned["params"] * 4 / 2**20  # + activations
    assert tuned["peak_rss_mb"] >= bound - 1e-6
