import pytest
import torch
from torch import nn

from helpers import make_recipe
from lowbit import api
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
from lowbit.primitives import sqnr_db
from lowbit.recipes import load_recipe


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


def test_a_diffusers_unet_quantizes_whole():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the image extra")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    ).eval()  # fmt: skip
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
