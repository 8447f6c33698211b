"""The digits DDPM: its data, its seeded training, its sampler, and a quantized copy with
per-step ranges that saves and loads (random weights here; the trained model is scored in
benchmarks/ddpm_table.py)."""

import pytest
import torch

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.errors import LowbitError
from lowbit.models.images.ddpm import UNET, DigitsDDPM, digits, noise, train_digits_ddpm
from lowbit.nn import QuantConv, QuantLinear

pytest.importorskip("sklearn", reason="the digits come with scikit-learn (lowbit[image])")
TINY = {**UNET, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}


def test_digits_are_split_and_scaled_and_the_noise_is_seeded():
    train, held = digits()
    assert train.shape == (1500, 1, 16, 16) and held.shape == (297, 1, 16, 16)
    assert float(train.min()) >= -1 and float(train.max()) <= 1 and float(train.max()) > 0.9
    assert torch.equal(noise(3, seed=1), noise(3, seed=1))
    assert not torch.equal(noise(3, seed=1), noise(3, seed=0))


def test_training_is_seeded_and_the_sampler_maps_noise_to_images():
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = train_digits_ddpm(DigitsDDPM(TINY, steps=4), steps=2, batch=8, lr=1e-3, seed=3,
                                  holdout=297, progress=False)  # fmt: skip
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with torch.no_grad():
        out = model(noise(2, seed=0))
    assert out.shape == (2, 1, 16, 16) and float(out.abs().max()) <= 1
    with pytest.raises(LowbitError, match=r"noise \(N, 1, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))


def test_a_quantized_sampler_keeps_one_range_per_step_slice_and_reloads_exactly(tmp_path):
    from lowbit.export import export
    from lowbit.models.load import LoadedModel, load_model

    torch.manual_seed(0)
    model = DigitsDDPM().eval()  # the zoo's architecture (random weights), 25 steps
    recipe = api.load_recipe("conv-w8a8-steps")
    calibration = image_calibration(noise(2, seed=1), "noise")
    report = api.quantize(model, recipe, calibration, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 64 and sum(isinstance(m, QuantConv) for m in layers) == 35
    groups = recipe.activations.step_groups
    assert all(m.act_scale.shape == (groups,) for m in layers)
    spread = sorted(float(m.act_scale.max() / m.act_scale.min()) for m in layers)
    assert spread[-1] > 1.5  # some layers' inputs change range with the timestep
    folder = api.save(model, tmp_path / "q", report, source=LoadedModel(model, None,
                      "ddpm-digits", "image"))  # fmt: skip
    loaded = load_model(str(folder), kernels=False)  # the kernels: tests/nn/test_steps.py
    z = noise(2, seed=0)
    with torch.no_grad():
        assert torch.equal(loaded.model(z), model(z))
    assert loaded.manifest["layers"]["unet.conv_in"]["activations"]["step_groups"] == groups
    with pytest.raises(LowbitError, match="sampling loop"):
        export(folder, "onnx", tmp_path / "onnx")
    pytest.importorskip("litert_torch", reason="the litert extra is not installed")
    with pytest.raises(LowbitError, match="sampling loop"):
        export(folder, "litert", tmp_path / "x.tflite")
