import pytest
import torch
from torch import nn

from helpers import make_recipe
from lowbit import api
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe, load_recipe


def test_quantizes_every_planned_layer_and_reports(tiny_model):
    x = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        before = tiny_model(x).logits
    report = quantize_weights(tiny_model, load_recipe("w8-rtn"), progress=False)
    assert len(report.layers) == 7 * 2  # 7 linears per Llama block, lm_head ignored
    assert all(isinstance(tiny_model.get_submodule(n), QuantLinear) for n in report.layers)
    assert type(tiny_model.lm_head) is torch.nn.Linear
    assert all(r.weight_sqnr_db > 35 for r in report.layers.values())
    with torch.no_grad():
        after = tiny_model(x).logits
    assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class _UNetish(nn.Module):
    """Convolutions around a ModuleList of identical linear blocks: not a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        h = self.conv_in(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h.permute(0, 3, 1, 2))


def test_a_model_with_convolutions_and_no_language_family_is_quantized_whole():
    from lowbit.pipeline.weights import quantized_whole

    torch.manual_seed(0)
    model, x = _UNetish().eval(), torch.rand(1, 3, 6, 6)
    assert quantized_whole(model)
    with torch.no_grad():
        ref = model(x)
    report = api.quantize(model, make_recipe({"bits": 8, "group_size": -1}, ignore=()),
                          progress=False)  # fmt: skip
    assert set(report.layers) == {"conv_in", "blocks.0.fc", "blocks.1.fc", "conv_out"}
    with torch.no_grad():
        assert sqnr_db(ref, model(x)) > 30


def _tiny_unet():
    """A seeded two-level conditional diffusers UNet (skips without the image extra)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the image extra")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    ).eval()  # fmt: skip


def test_a_diffusers_unet_quantizes_whole():
    unet = _tiny_unet()
    inputs = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = unet(*inputs).sample
    report = api.quantize(unet, make_recipe({"bits": 8, "group_size": -1}, ignore=()),
                          progress=False)  # fmt: skip
    kinds = {type(m).__name__ for m in unet.modules()}
    assert "QuantConv" in kinds and "Conv2d" not in kinds and "Linear" not in kinds
    assert "conv_in" in report.layers
    with torch.no_grad():
        assert sqnr_db(ref, unet(*inputs).sample) > 30


def _unet_inputs(n: int, seed: int):
    """A bare conditional UNet's three inputs: noisy latents, a timestep each, text states."""
    from lowbit.data import ModelInputs

    g = torch.Generator().manual_seed(seed)
    latents, steps = torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)
    text = torch.randn(n, 5, 16, generator=g)
    return ModelInputs((latents, steps), {"encoder_hidden_states": text})


def test_a_bare_unet_calibrates_static_ranges_on_its_three_inputs():
    from lowbit.calibration import input_calibration
    from lowbit.models.modules import forward_logits

    unet = _tiny_unet()
    calib, held = input_calibration(_unet_inputs(8, 1), "noise"), _unet_inputs(4, 2)
    with torch.no_grad():
        ref = forward_logits(unet, held)
    acts = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}
    recipe = Recipe.from_dict({"version": 1, "name": "t", "algorithm": "rtn", "ignore": [],
                               "weights": {"bits": 8, "symmetric": True, "group_size": -1},
                               "activations": acts})  # fmt: skip
    report = api.quantize(unet, recipe, calib, progress=False)
    static = [m for m in unet.modules() if isinstance(m, QuantLinear) and m.act is not None]
    assert len(static) == len(report.layers) > 20
    assert all(bool((m.act_scale > 0).all()) for m in static)  # every range calibrated
    with torch.no_grad():
        db = sqnr_db(ref, forward_logits(unet, held))
    assert db > 25, db
    assert report.calibration.describe()["inputs"]["encoder_hidden_states"] == [5, 16]


class _Conditional(nn.Module):
    """A class-conditional upscaler: ``forward(x, labels)``, the label embedded and added."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 8)
        self.conv1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)

    def forward(self, x, labels):
        h = self.act(self.conv1(x)) + self.embed(labels)[:, :, None, None]
        return self.up(self.act(self.conv2(h)))


@pytest.mark.parametrize("algorithm", ["gptq", "awq+gptq"])
def test_a_two_input_model_takes_calibrated_weights_through_model_inputs(algorithm):
    from lowbit.calibration import input_calibration
    from lowbit.data import ModelInputs
    from lowbit.models.modules import forward_logits

    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        return ModelInputs((torch.rand(n, 3, 12, 12, generator=g),
                            torch.randint(0, 4, (n,), generator=g)))  # fmt: skip

    results = {}
    for algo in ("rtn", algorithm):
        torch.manual_seed(0)
        model, held = _Conditional().eval(), draw(8, 2)
        with torch.no_grad():
            ref = forward_logits(model, held)
        body = {"version": 1, "name": "t", "algorithm": algo, "ignore": ["embed"],
                "weights": {"bits": 4, "group_size": -1}}  # fmt: skip
        report = api.quantize(model, Recipe.from_dict(body), input_calibration(draw(32, 1), "x"),
                              progress=False)  # fmt: skip
        assert set(report.layers) == {"conv1", "conv2", "up"}
        with torch.no_grad():
            results[algo] = sqnr_db(ref, forward_logits(model, held))
    assert results[algorithm] > results["rtn"] + 1  # dB: calibrated on the two inputs


class _Timed(nn.Module):
    """``forward(x, t)``: the middle activations grow tenfold along the timestep axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv2(torch.relu(self.conv1(x)) * (1 + 9 * t / 1000)[:, None, None, None])


def test_a_bare_denoiser_gets_one_range_per_step_group_from_positions():
    from lowbit.calibration import input_calibration
    from lowbit.data import ModelInputs
    from lowbit.models.modules import forward_logits

    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (n,), generator=g).float()
        return ModelInputs((torch.rand(n, 3, 8, 8, generator=g), t), positions=t / 1000)

    errors = {}
    for groups in (1, 4):
        torch.manual_seed(0)
        model, held = _Timed().eval(), draw(32, 2)
        with torch.no_grad():
            ref = forward_logits(model, held)
        acts = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False,
                "step_groups": groups}  # fmt: skip
        body = {"version": 1, "name": "t", "ignore": [], "activations": acts,
                "weights": {"bits": 8, "symmetric": True, "group_size": -1}}  # fmt: skip
        api.quantize(model, Recipe.from_dict(body), input_calibration(draw(64, 1), "t"),
                     progress=False)  # fmt: skip
        scales = model.conv2.act_scale
        assert scales.numel() == groups
        early = held.positions < 0.25  # where one range sized for the late steps is too wide
        with torch.no_grad():
            errors[groups] = sqnr_db(ref[early], forward_logits(model, held)[early])
    assert bool((scales[1:] > scales[:-1]).all())  # later steps: wider ranges
    assert errors[4] > errors[1] + 3, errors  # dB
