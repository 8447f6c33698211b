"""A recipe's attention block: rounded caches from quantization on, saved and loaded with the
folder, and inside the canary the folder records."""

from __future__ import annotations

import torch

from helpers import make_recipe
from lowbit import api
from lowbit.eval.canary import check
from lowbit.formats.spec import AttentionSpec
from lowbit.nn.attention import ATTRIBUTE, attention_modules, install_attention

SPEC = AttentionSpec(kv_bits=2, hadamard=True)  # coarse on purpose: its effect must show


def recipe():
    import dataclasses

    return dataclasses.replace(make_recipe({"bits": 4, "group_size": 32}), attention=SPEC)


def test_saved_attention_is_installed_on_load_and_counted_by_the_canary(tiny_folder, tmp_path):
    out, _ = api.quantize_to(str(tiny_folder), recipe(), tmp_path / "q", progress=False)
    loaded = api.load(out, kernels=False)
    assert loaded.manifest["recipe"]["attention"] == SPEC.to_dict()
    assert all(getattr(m, ATTRIBUTE) == SPEC for m in attention_modules(loaded.model))
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    src = api.load_model(str(tiny_folder))
    api.quantize(src.model, make_recipe({"bits": 4, "group_size": 32}), progress=False)
    with torch.inference_mode():
        plain = src.model(ids).logits
        install_attention(src.model, SPEC)
        rounded = src.model(ids).logits
        got = loaded.model(ids).logits
    assert torch.allclose(got, rounded, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    # the canary's quantized side ran with the rounded cache: the folder passes its own check
    result = check(loaded.model, out, loaded.manifest)
    assert result.ok and abs(result.kl - loaded.manifest["canary"]["kl"]) < 1e-5


def test_key_centres_are_measured_saved_and_loaded(tiny_folder, tmp_path):
    """``center_keys``: each block's centres measured on the calibration windows (the keys its
    quantized weights compute), the same streamed or in memory, saved with the weights and
    loaded back; the recipe needs calibration; an export leaves them out."""
    import dataclasses

    import pytest

    from lowbit.calibration import CalibrationSet
    from lowbit.errors import LowbitError
    from lowbit.nn.attention import CENTER

    spec = AttentionSpec(kv_bits=4, group_size=16, center_keys=True)
    weights = make_recipe({"bits": 4, "group_size": 32, "symmetric": True})  # exportable
    rec = dataclasses.replace(weights, attention=spec)
    assert rec.needs_calibration
    windows = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    data = CalibrationSet("test", 4, 24, 0, windows)
    with pytest.raises(LowbitError, match="center_keys"):
        api.quantize_to(str(tiny_folder), rec, tmp_path / "none", progress=False)
    out, _ = api.quantize_to(str(tiny_folder), rec, tmp_path / "q", data, progress=False)
    loaded = api.load(out, kernels=False)
    mem = api.load_model(str(tiny_folder))
    api.quantize(mem.model, rec, data, progress=False)
    centers = [getattr(m, CENTER) for m in attention_modules(loaded.model)]
    expected = [getattr(m, CENTER) for m in attention_modules(mem.model)]
    assert all(c.abs().max() > 0 for c in centers)
    assert all(torch.allclose(c, e, atol=1e-6) for c, e in zip(centers, expected, strict=True))
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(loaded.model(ids).logits, mem.model(ids).logits, atol=1e-5)
    result = check(loaded.model, out, loaded.manifest)  # the canary saw the centred cache
    assert result.ok and abs(result.kl - loaded.manifest["canary"]["kl"]) < 1e-5
    from safetensors.torch import load_file

    from lowbit.export import export

    exported = export(out, "compressed-tensors", tmp_path / "ct")
    assert not any(CENTER in k for k in load_file(str(exported.path / "model.safetensors")))


def test_a_cache_group_the_heads_refuse_is_found_before_the_work_folder(tiny_folder, tmp_path):
    """Not per block, after a learned rotation has trained and left its work folder."""
    import dataclasses

    import pytest

    from lowbit.algorithms.rotate import RotateOptions
    from lowbit.calibration import CalibrationSet
    from lowbit.errors import LowbitError

    head = attention_modules(api.load_model(str(tiny_folder)).model)[0].head_dim
    rec = dataclasses.replace(recipe(), attention=AttentionSpec(kv_bits=4, group_size=2 * head),
                              rotate=RotateOptions(kind="learned", steps=2))  # fmt: skip
    windows = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    data = CalibrationSet("test", 4, 24, 0, windows)
    with pytest.raises(LowbitError, match="does not divide the head dimension"):
        api.quantize_to(str(tiny_folder), rec, tmp_path / "q", data, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [tiny_folder.name]  # no work folder


def test_the_api_refuses_a_cache_group_before_a_learned_rotation_trains(tiny_folder):
    """api.quantize (in memory) checks the heads first too: the model is left as it was."""
    import dataclasses

    import pytest

    from lowbit.algorithms.rotate import RotateOptions
    from lowbit.calibration import CalibrationSet
    from lowbit.errors import LowbitError

    model = api.load_model(str(tiny_folder)).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = attention_modules(model)[0].head_dim
    rec = dataclasses.replace(recipe(), attention=AttentionSpec(kv_bits=4, group_size=2 * head),
                              rotate=RotateOptions(kind="learned", steps=2))  # fmt: skip
    windows = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    data = CalibrationSet("test", 4, 24, 0, windows)
    with pytest.raises(LowbitError, match="does not divide the head dimension"):
        api.quantize(model, rec, data, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
