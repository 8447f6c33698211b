import torch

from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_weights
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
